"""The one exception type users see: its message says what was wrong and what to do."""


class SaelabError(Exception):
    """A user-facing error. The CLI prints its message (no traceback) and exits with status 2."""
