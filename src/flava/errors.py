"""Errors a user can cause. The CLI prints their message alone, without a traceback."""


class FlavaError(Exception):
    """Base of every error whose message tells the user what to fix."""


class ConfigError(FlavaError, ValueError):
    """A config file or override names an unknown key or holds a bad value."""


class CheckpointError(FlavaError, ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or disagrees with its config."""


class InputError(FlavaError, ValueError):
    """A tensor handed to the model has the wrong shape, size or values."""


class DataError(FlavaError, ValueError):
    """A data path matches nothing or a data set has no usable sample."""
