"""Errors the runtime raises; each message names the problem and the fix."""


class BundleError(RuntimeError):
    """An engine bundle is missing, incomplete, altered, or does not fit this request."""


class FeedError(ValueError):
    """A tensor fed to an engine has the wrong name, shape or dtype."""


class Cancelled(RuntimeError):
    """A progress callback asked to stop the generation."""
