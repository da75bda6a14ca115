"""Errors meant for people: each says what was wrong, what was expected, and what to do."""


class PtpError(Exception):
    """Base class for every error ptp raises on purpose."""


class ModelNotFoundError(PtpError):
    """The model id or path could not be resolved to files."""


class UnsupportedModelError(PtpError):
    """The checkpoint exists but ptp cannot run it (architecture, quantization, shape)."""


class ConfigError(PtpError):
    """A flag or argument has a value ptp cannot use."""


class RankFailedError(PtpError):
    """A tensor-parallel rank died or raised; the run cannot continue."""
