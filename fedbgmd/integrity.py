"""Run-folder integrity: one run per folder (a lock) and stops by signal recorded as such.

- :func:`lock_run_dir` takes an exclusive lock on a run folder (``.fedbgmd.lock``, holding the
  owner's pid) before anything else is written there. It is an ``flock`` on the file, so the
  kernel drops it when its process dies: a lock file left by a dead process is stale and simply
  taken over (with a warning naming that pid).
- :func:`stop_on_signals` turns SIGTERM and SIGINT into :class:`RunInterrupted` in the main
  thread, so the code that writes ``summary.json`` in a ``finally`` runs for both, and
  :func:`stop_status` names the outcome ("interrupted" or "failed") the same way for every engine.

Plain python: no torch, flwr or hydra imports here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from pathlib import Path
from types import FrameType

log = logging.getLogger("fedbgmd")

LOCK_FILE = ".fedbgmd.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run folder."""


class RunInterrupted(KeyboardInterrupt):
    """The process got SIGTERM or SIGINT (a KeyboardInterrupt, so Ctrl-C reads the same)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def interrupt_signal(err: BaseException) -> int:
    """The signal number that stopped the run (SIGINT for a plain KeyboardInterrupt)."""
    return err.signum if isinstance(err, RunInterrupted) else int(signal.SIGINT)


def stop_status(err: BaseException) -> str:
    """summary.json's status for a run ended by ``err``."""
    return "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"


def stop_error(err: BaseException) -> str:
    """summary.json's error text for a run ended by ``err``."""
    if isinstance(err, KeyboardInterrupt):
        return str(err) if isinstance(err, RunInterrupted) else "interrupted by SIGINT"
    return f"{type(err).__name__}: {err}"


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise RunInterrupted(signum)


def stop_on_signals() -> None:
    """SIGTERM (what schedulers and ``kill`` send) and SIGINT raise RunInterrupted."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_interrupted)


class RunLock:
    """An exclusive lock on one run folder; :meth:`release` (or process exit) drops it."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # unlinked while still held: a process that opened the old file re-checks the inode
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _holder(text: str) -> int | None:
    try:
        return int(text.split()[0])
    except (IndexError, ValueError):
        return None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process.

    Raises RunDirLocked naming the holder's pid when a live process holds it, OSError naming the
    path when the folder or lock file cannot be created.
    """
    run_dir = Path(run_dir).absolute()
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"cannot create the run folder {run_dir}: {err.strerror}") from err
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the lock file {path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 64, 0).decode(errors="replace"))
            os.close(fd)
            who = f"process {holder}" if holder is not None else "another process"
            raise RunDirLocked(f"{run_dir} is in use by {who} (lock file {path})") from None
        try:  # the holder may have released (unlinked) the file between our open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(os.pread(fd, 64, 0).decode(errors="replace"))
    if previous is not None and previous != os.getpid() and not _pid_alive(previous):
        log.warning(
            "%s: took over the stale lock of process %d (no longer running)", run_dir, previous
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(run_dir, fd)


__all__ = [
    "LOCK_FILE",
    "RunDirLocked",
    "RunInterrupted",
    "RunLock",
    "interrupt_signal",
    "lock_run_dir",
    "stop_error",
    "stop_on_signals",
    "stop_status",
]
