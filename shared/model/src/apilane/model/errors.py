"""The root of apilane's typed errors: every error we raise on purpose derives from it."""


class ApilaneError(Exception):
    """Base class: callers can catch our own failures without catching programming errors."""


class ConfigError(ApilaneError):
    """A setting from the environment is missing or invalid; the message names the variable."""
