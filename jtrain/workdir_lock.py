"""One run at a time per workdir: a lock that the kernel drops when the process holding it dies.

Two runs on one workdir would write every metric twice and save over each other's
checkpoints, so a run holds WORKDIR/jtrain.lock (an `flock`) while it trains or evaluates, and
writes who it is into the file (host, pid, since when, its command line) for the error a
second run gets, and for a person who reads the file. The
kernel releases an flock when its holder exits, however it exits (SIGKILL included), so a lock
is never stale: the file stays, but nobody holds it. Linux emulates flock over NFS with POSIX
locks that the server holds, so the lock also works between hosts there (a dead host's lock is
dropped when its NFS lease expires). Filesystems without locks (some FUSE mounts) get a warning
and no lock.

Light on purpose (no JAX): a test can hold a workdir from a helper process in a fraction of a
second.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time

from jtrain.errors import UserError, describe_os_error

FILE = "jtrain.lock"
# flock failures that mean "this filesystem has no locks", not "someone holds it".
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class WorkdirError(UserError, RuntimeError):
    """A workdir that cannot be used as asked; the message says what to do."""


@dataclasses.dataclass
class Lock:
    """A held workdir lock (`fd` None: the filesystem has no locks)."""

    path: str
    fd: int | None

    def release(self) -> None:
        """Lets the next run have the workdir (the file stays: removing it would race)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def acquire(workdir: str) -> Lock:
    """Takes WORKDIR/jtrain.lock (making the directory), or raises WorkdirError naming the run
    that holds it, or saying why the directory cannot be written."""
    path = os.path.join(workdir, FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # read-only, no permission, a part of the path is a file
        raise WorkdirError(f"cannot use --workdir={workdir}: {_why(err)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirError(
            f"--workdir={workdir} is in use by another run ({holder(path)}): two runs on one "
            "workdir would write over each other. Wait for it to end or stop it, or use "
            "another --workdir."
        ) from None
    except OSError as err:
        os.close(fd)
        if err.errno not in _NO_LOCKS:
            raise
        print(
            f"jtrain: warning: the filesystem of {workdir} has no file locks, so nothing stops "
            "a second run on this workdir: start one run at a time there.",
            file=sys.stderr,
            flush=True,
        )
        return Lock(path, None)
    try:
        _write_holder(fd)
    except OSError as err:  # a full disk: nothing to name the holder with, so no lock
        os.close(fd)
        raise WorkdirError(f"cannot use --workdir={workdir}: {_why(err)}") from None
    return Lock(path, fd)


def holder(path: str) -> str:
    """Who holds (or last held) the lock at `path`: "pid P on host H since T"."""
    try:
        with open(path) as f:
            who = json.load(f)
        return f"pid {who['pid']} on host {who['host']} since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _write_holder(fd: int) -> None:
    who = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(sys.argv)[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)


def _why(err: OSError) -> str:
    return describe_os_error(err) or f"{err.strerror or err}: use another --workdir"
