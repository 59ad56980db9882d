"""A small tmpfs for the SQLite store, filled to the last byte on demand.

SQLite's own size limit (`PRAGMA max_page_count`) is a setting of the
server's connections, out of a client's reach, so the fault is a real full
file system: the store lives on a tmpfs of a few megabytes, and a filler file
takes whatever room is left. Mounting needs CAP_SYS_ADMIN (root in this
sandbox); without it the fault is skipped with the reason `probe()` gives.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import subprocess
import tempfile
from pathlib import Path

FILLER = ".filler"
CHUNK = 1024 * 1024


def _mount(path: Path, size_mb: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _umount(path: Path) -> None:
    result = subprocess.run(
        ["umount", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        # Something still holds a file open: detach now, freed when it closes.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


@functools.cache
def probe() -> str | None:
    """None when a tmpfs can be mounted here; otherwise why not."""
    with tempfile.TemporaryDirectory(prefix="realm-faults-probe-") as d:
        try:
            result = _mount(Path(d), 1)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run mount: {exc}"
        if result.returncode != 0:
            return (
                f"mount -t tmpfs is not permitted (uid {os.getuid()}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        _umount(Path(d))
    return None


class TmpfsDisk:
    """A tmpfs of `size_mb` at `path` while entered."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.mounted = False
        self.fills = 0

    def mount(self) -> TmpfsDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        result = _mount(self.path, self.size_mb)
        if result.returncode != 0:
            raise OSError(f"mount tmpfs on {self.path}: {result.stderr.strip()}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Take every free byte; returns how many were taken."""
        self.fills += 1
        taken = 0
        block = b"\0" * CHUNK
        fd = os.open(self.path / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = CHUNK
            # Bounded: every pass either writes or halves the size.
            while size:
                try:
                    written = os.write(fd, block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    written = 0
                taken += written
                if written < size:
                    size //= 2
        finally:
            os.close(fd)
        return taken

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / FILLER).unlink()

    def unmount(self) -> None:
        if self.mounted:
            self.mounted = False
            _umount(self.path)
