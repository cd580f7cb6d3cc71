"""The one exception type a user should ever see from a bad config: a single line, no traceback."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the value and the valid choices."""
