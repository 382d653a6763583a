"""One training process per run directory: an exclusive OS lock on the directory itself.

Two trainers writing one run directory corrupt each other's checkpoints (one renames the other's
``step_N.tmp`` away mid-write).  :func:`lock_run_dir` takes ``flock(LOCK_EX | LOCK_NB)`` on a file
descriptor of the run directory.  The kernel drops the lock when the process exits, however it
exits (``kill -9`` included), so there is no stale lock to clean up after a crash.  Locking the
directory's own descriptor writes nothing, so a process that is refused later (bad checkpoint,
bad data) leaves the directory as it found it; the holder's pid is found in ``/proc/locks``, or in
``<run>/.lock``, which the holder writes once its run is known to start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..teachers.base import SenseflowError

PID_FILE = ".lock"

# run directory (resolved) -> open descriptor holding the lock, for this process
_HELD: dict[str, int] = {}


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def holder_pid(run_dir: Path) -> int | None:
    """The pid holding the lock on ``run_dir``, from ``/proc/locks`` (Linux) or the pid file."""
    try:
        st = os.stat(run_dir)
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        with open("/proc/locks") as fh:
            for line in fh:
                parts = line.split()
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue
                major, minor, ino = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    try:
        return int((Path(run_dir) / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def lock_run_dir(run_dir: Path) -> None:
    """Hold the exclusive lock on the existing directory ``run_dir`` until :func:`release` or exit.

    Re-locking a directory this process already holds is a no-op.  Another process holding it is
    a one-line :class:`SenseflowError` naming its pid.
    """
    key = _key(run_dir)
    if key in _HELD:
        return
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(Path(run_dir))
        who = f"process {pid}" if pid is not None else "another process"
        raise SenseflowError(f"paths.output {str(run_dir)!r} is in use by {who} (one training process per run "
                             "directory): wait for it to finish, stop it, or choose another paths.output") from None
    except OSError:
        os.close(fd)
        raise
    _HELD[key] = fd


def write_pid(run_dir: Path) -> None:
    """Record this process as the holder (for file systems without ``/proc/locks``)."""
    (Path(run_dir) / PID_FILE).write_text(f"{os.getpid()}\n")


def holds(run_dir: Path) -> bool:
    return _key(run_dir) in _HELD


def release(run_dir: Path) -> None:
    """Give the lock back (the pid file goes too); a directory this process does not hold is ignored."""
    fd = _HELD.pop(_key(run_dir), None)
    if fd is None:
        return
    try:
        (Path(run_dir) / PID_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)
