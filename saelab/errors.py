"""The one exception type users see: its message says what was wrong and what to do."""


class SaelabError(Exception):
    """A user-facing error. The CLI prints its message (no traceback) and exits with status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command. The CLI prints `message` (or its generic advice) and exits 128 + signum."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum
        self.message = message
