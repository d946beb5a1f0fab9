"""One writer per output folder: an advisory lock (flock) on a hidden file beside the folder, held while a command
writes into it, so a second `saelab cache` or `saelab train` on the same --out is refused instead of racing."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Self

from saelab.errors import SaelabError


class FolderLock:
    """Holds the lock on `folder` from construction until release() (or until the object is collected)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder).absolute()
        self.path = folder.parent / f".{folder.name}.saelab-lock"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        except OSError as exc:
            raise SaelabError(f"Cannot write to {folder} ({exc.strerror}); choose a writable --out.") from exc
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise SaelabError(
                f"Another saelab process is writing to {folder}; wait for it to finish, or choose another --out."
            ) from None

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
