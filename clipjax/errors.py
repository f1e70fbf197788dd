"""The one exception type the CLI turns into a clean message and exit status.

Library code raises `ClipjaxError` (or `ConfigError`) for anything the user
can fix — a bad config value, a missing file, a checkpoint of another
architecture — so the CLI prints one line instead of a traceback.
"""


class ClipjaxError(Exception):
    """A problem with the user's input; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(ClipjaxError, ValueError):
    """An invalid config: names the offending key. The CLI exits with status 2."""

    exit_code = 2

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config.{key}: {message}" if key else message)


class WorkerDied(ClipjaxError):
    """A data worker process died: the input pipeline cannot go on (the trainer saves
    its last state first)."""
