"""The errors saejax raises for a user's mistake or a damaged input, in one place.

The CLI turns each into one line naming the field, file or shape at fault (no traceback).
"""


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the field."""


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them restores and verifies."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the run stopped without saving the bad state."""
