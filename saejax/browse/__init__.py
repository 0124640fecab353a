"""The feature browser: a static site (no server, works from file://) over an analysis directory
written by `saejax.analysis.features.analyze`. See `site.py` for the site's layout."""

from saejax.browse.site import write_site

__all__ = ["write_site"]
