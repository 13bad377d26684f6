"""Errors the runtime raises; each message names the problem and the fix."""


class BundleError(RuntimeError):
    """An engine bundle is missing, incomplete, altered, or does not fit this request."""


class FeedError(ValueError):
    """A tensor fed to an engine has the wrong name, shape or dtype."""


class Cancelled(RuntimeError):
    """A progress callback asked to stop the generation."""


class NonFiniteError(FloatingPointError):
    """NaN or inf where a finite value was needed; the message names where it arose and the likely cause.

    fp16_overflow: an fp16 engine turned finite inputs into NaN/inf (rebuilding in fp32 is the fix).
    upstream: the engine's inputs were already NaN/inf or extreme: a setting or input of the request caused it.
    """

    def __init__(self, message: str, *, fp16_overflow: bool = False, upstream: bool = False):
        super().__init__(message)
        self.fp16_overflow, self.upstream = fp16_overflow, upstream
