"""The one exception type the command line turns into a one-line message."""


class SharpError(Exception):
    """A problem the user can fix; its message says what to change."""

    exit_code = 2


class RunDiverged(SharpError):
    """Training met a NaN or infinite loss at optimizer step `step`; the run is marked `diverged`."""

    exit_code = 3

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class Interrupted(SharpError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint."""

    exit_code = 130
