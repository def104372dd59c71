"""User-facing errors: each is shown as one line and ends the program with a non-zero exit."""


class DMLError(Exception):
    """An error the user can fix: a bad config value, missing data or an unusable file.

    The message is one line that names the key or file, the bad value and the fix.
    """


class ConfigError(DMLError, ValueError):
    """A config value or argument that is invalid or unsupported."""


class DataError(DMLError):
    """A dataset that is missing, unreadable or too small for the requested splits."""


class CheckpointError(DMLError):
    """A checkpoint or run folder that is missing, corrupt, unsafe or does not fit the config."""
