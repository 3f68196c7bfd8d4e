"""One writer per directory: an OS lock that only the process that took it holds.

`flock` locks belong to an open file description, which `fork` shares with the child: a loader
worker forked while the lock is held would keep it after its parent was killed, and the next
run would be refused, naming a dead process. So the descriptor is opened with O_CLOEXEC (an
exec'd child never sees it) and every forked child closes its copy at once
(`os.register_at_fork`); closing a copy drops that reference only, the parent keeps its lock.
POSIX `fcntl` record locks would not be inherited, but any close of the file by the holder drops
them, and a second lock in the same process would be granted silently.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError

class InUse(ConfigError):
    """Refused: another process holds the lock. What that process owns is not this one's to clean."""


# Descriptors of the locks this process holds; forked children close theirs.
_HELD: set[int] = set()

EXITING_WAIT_S = 10.0
"""How long a lock whose holder has exited is waited for: its last threads, still exiting (one
in an fsync is killed only when it returns), share its files until they have."""


def _exiting(holder: str) -> bool:
    """The holder a lock file names ("pid N on HOST") is a process of this host that has exited,
    or whose first thread has (a zombie leader: what a killed run is while its other threads end)."""
    m = re.fullmatch(r"pid (\d+) on (.+)", holder)
    if m is None or m[2] != socket.gethostname():
        return False
    try:
        os.kill(int(m[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    try:
        with open(f"/proc/{m[1]}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextmanager
def hold(path: str | os.PathLike, what: str, fix: str, remove: bool = False) -> Iterator[None]:
    """Hold the lock file `path` for the block, or raise ConfigError: '`what` is in use by
    another flava run (pid N on HOST); `fix`'. The OS releases it when the holder dies; a holder
    of this host that is exiting is waited for (EXITING_WAIT_S at most). With `remove`, the file
    is removed when the block ends (a lock beside what it guards, not inside it). A lock taken on
    a file that was removed or replaced meanwhile (by such a holder, or with the folder it was in)
    is taken again on the file now at `path`."""
    path = Path(path)
    owner = os.getpid()
    deadline = time.monotonic() + EXITING_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # A file system without locks (Lustre mounted noflock, NFS without its lock daemon):
                # nobody holds it, and no run could; said, not refused as "in use".
                os.close(fd)
                _say_unlocked(path, e)
                yield
                return
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            # A run killed a moment ago and restarted at once (a scheduler's requeue): its
            # lock goes with its last thread.
            if time.monotonic() < deadline and _exiting(holder):
                time.sleep(0.05)
                continue
            raise InUse(f"{what} is in use by another flava run ({holder}); {fix}") from None
        if not _still_at(fd, path):
            os.close(fd)  # removed between our open and our lock: the lock that counts is the file there now
            continue
        break
    try:
        _HELD.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {owner} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        # A forked child that runs this block's exit has already closed its copy.
        if os.getpid() == owner:
            try:
                if remove and _still_at(fd, path):  # while held, and still ours: no other holder loses its file
                    path.unlink(missing_ok=True)
            finally:
                _HELD.discard(fd)
                os.close(fd)


def _say_unlocked(path: Path, e: OSError) -> None:
    print(f"note: {path.parent} is on a file system that takes no locks ({e.strerror or e}): nothing stops a "
          "second run from writing there at the same time", file=sys.stderr)


def _still_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
