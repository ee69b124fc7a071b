"""One writer per output: a lock file beside every output directory or file a command writes.

``OutputLock(out)`` holds ``.<name>.lock`` next to ``out`` for as long as a command runs. The lock is
an ``fcntl.flock`` on that file, so the kernel releases it when its process dies in any way (even
``kill -9``); the file itself records the holder's pid for the message a second writer gets. A lock
file left behind by a dead process therefore holds no lock and is taken over. On filesystems without
``flock`` the file is created with ``O_EXCL`` and a lock whose recorded pid is no longer running is
treated as stale.

Taking the lock also removes what dead writers of the same output left behind (hidden temporary
files and directories of :mod:`quest_export.artifacts`): while the lock is held nobody else is
writing them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from quest_export.errors import UserError

_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}


def lock_path_for(out: Path) -> Path:
    """The lock file that guards ``out``: a hidden sibling ``.<name>.lock``."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        holder = json.loads(data.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(out: Path, lock: Path, holder: dict[str, Any]) -> UserError:
    pid = holder.get("pid", "unknown")
    return UserError(
        f"{out} is being written by another quest-export process (pid {pid}); "
        f"wait for it or remove the stale lock {lock}"
    )


class OutputLock:
    """Exclusive lock on one output path (directory or file); a context manager."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path_for(self.out)
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, if the lock was stale

    # -- acquire ---------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in _BUSY:
                    raise _busy(self.out, self.path, holder) from None
                return self._acquire_exclusive_file()  # no flock on this filesystem
            # We hold the flock; make sure it is on the file that is at the path now (a releasing
            # holder unlinks the file, so an inode we opened before that is no longer the lock).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous.get("pid"):
                self.took_over = previous
            self._record(fd)
            self.fd = fd
            self._clean_leftovers()
            return self
        raise UserError(f"could not take the lock {self.path} (it keeps changing); retry, or remove it if no quest-export is running")

    def _acquire_exclusive_file(self) -> "OutputLock":
        """Fallback without flock: O_EXCL creation; a lock of a dead pid is stale and taken over."""
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                holder = _read_holder(fd)
                os.close(fd)
                pid = holder.get("pid")
                if isinstance(pid, int) and _pid_alive(pid) and holder.get("host") in (None, socket.gethostname()):
                    raise _busy(self.out, self.path, holder) from None
                if not holder and time.time() - self._mtime() < 5:
                    time.sleep(0.1)  # being created right now: its holder has not written its pid yet
                    continue
                self.took_over = holder or {"pid": None}
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            self._record(fd)
            self.fd = fd
            self._clean_leftovers()
            return self
        raise UserError(f"could not take the lock {self.path}; retry, or remove it if no quest-export is running")

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    @staticmethod
    def _record(fd: int) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:2000]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)

    def _clean_leftovers(self) -> None:
        from quest_export.artifacts import remove_stale_temporaries

        remove_stale_temporaries(self.out)

    # -- release ---------------------------------------------------------------------------
    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
