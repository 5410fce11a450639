"""One training per run directory: a lock file that rank 0 holds for the whole of `llm.train.fit`.

The lock is `RUN_DIR/.llm-run.lock`, held with `fcntl.flock` on a descriptor kept open (the kernel drops it when
the process dies, however it dies) and naming its holder (host, pid, start time) for the message a second start
gets. A lock file that names a holder but is not locked is stale (a killed run; on this host its pid is checked
with os.kill(pid, 0)): it is taken over with a one-line warning. A run directory created here carries the
`llm.writer` marker of kind "run", so no command ever replaces it with a model or data directory.
"""
from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from llm import writer
from llm.errors import UserError

LOCK = ".llm-run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class RunLock:
    """`with RunLock(run_dir):` — the run directory is this process's until the block ends (also by an error)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: Optional[int] = None
        self.created = False

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir}: exists and is not a directory — choose another --train.run_dir")
        self.created = writer.make_dir(self.run_dir, "run")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                self._cleanup_dir()
                raise UserError(f"{self.run_dir}: in use by another training (pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')}, since {holder.get('started', '?')}) — wait for it to "
                                "end, stop it, or choose another --train.run_dir") from None
            try:  # the file may have been removed (released) between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _read(fd)
        if holder.get("pid") is not None:
            dead = holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))
            print(f"warning: {self.path}: taking over the stale lock of pid {holder['pid']} on {holder.get('host')} "
                  f"({'the process is gone' if dead else 'it no longer holds the lock'})", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting start then locks a fresh file
        finally:
            os.close(self.fd)
            self.fd = None
        self._cleanup_dir()

    def _cleanup_dir(self):
        """A run directory this lock created and nothing else used (the start failed) is removed again."""
        if self.created and {p.name for p in self.run_dir.iterdir()} <= {writer.MARKER}:
            (self.run_dir / writer.MARKER).unlink(missing_ok=True)
            self.run_dir.rmdir()
            self.created = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def holds_run_lock(is_main: Callable[[], bool]):
    """Decorator for `train(model, train_ds, val_ds, cfg, ...)`: on the main process (`is_main()`), the run
    directory `cfg.run_dir` is locked for the whole call. Under a launcher the process group is set up first and
    rank 0 tells the others whether it got the lock: when it did not, rank 0 raises its one-line error and every
    other rank exits 2 silently (none waits in a collective rank 0 never joins)."""
    import llm.train.dist as dist

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            many = dist.world_size() > 1
            if many:
                dist.init_distributed()
            lock, refusal = None, None
            if is_main():
                try:
                    lock = RunLock(sig.bind(*args, **kwargs).arguments["cfg"].run_dir).acquire()
                except Exception as e:  # noqa: BLE001 — re-raised below, once the other ranks know
                    refusal = e
            dist.raise_together(refusal)
            try:
                return fn(*args, **kwargs)
            finally:
                if lock is not None:
                    lock.release()
        return locked
    return wrap
