"""Feature analysis: what trained SAE features respond to, over a token dataset."""
