"""The project's error types that cross module boundaries (no imports: anyone may use them)."""


class ConfigError(ValueError):
    """A job spec is invalid; the message names the file and the field."""
