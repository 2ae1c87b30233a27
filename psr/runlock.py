"""One ``psr iterate`` per run folder at a time.

Two loops writing the same run folder (a job submitted twice, a requeued job whose first copy still
runs, a second terminal) would redo each other's stages and interleave their files. The first takes
``<run>/.lock``: an ``fcntl.flock`` on that file, which the kernel (or, on a network file system, its
lock manager) drops when the holding process dies however it ends, so a stale lock never blocks a
requeued job. The file also names the holder (host, pid, SLURM job, start time) for the message the
second one gets. Where the file system has no locks at all the file's content decides: a holder on
this host whose pid is gone is stale; a holder on another host is trusted (delete the file by hand
if you know it is gone), unless it is this same SLURM job: a requeued job that lands on other nodes
takes the lock over from its own earlier run.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from psr.config import ConfigError

LOCK_NAME = ".lock"


class RunLocked(ConfigError):
    """The run folder is in use by another ``psr iterate``."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return f"another psr iterate holds {path}"
    job = f", SLURM job {h['job']}" if h.get("job") else ""
    return f"psr iterate (pid {h.get('pid')} on {h.get('host')}{job}, since {h.get('since')}) holds {path}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _same_job_requeued(path: Path) -> bool:
    """Is the holder this same SLURM job, on another host? SLURM requeues a job only once its earlier run has
    ended, and may start it on other nodes; its lock can outlive it there (a network file system's lock lease,
    or no locks at all, where the file's content decides): that holder is this job's own past, not a rival."""
    job = os.environ.get("SLURM_JOB_ID")
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False
    return bool(job) and str(held.get("job")) == job and held.get("host") != socket.gethostname()


class RunLock:
    """``with RunLock(run_dir):`` held for the whole loop; raises :class:`RunLocked` if another holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and not _same_job_requeued(self.path):
                os.close(fd)
                raise RunLocked(f"run folder {self.path.parent} is in use: {_describe(self.path)}. Wait for it "
                                "to finish or stop it; two loops on one run folder would overwrite each other's "
                                "stages") from None
            # No locks on this file system (ENOLCK, EINVAL): judge by the holder written in the file.
            try:
                held = json.loads(self.path.read_text() or "{}")
            except ValueError:
                held = {}
            if held.get("host") and (held["host"] != socket.gethostname() or _pid_alive(held.get("pid"))) \
                    and held.get("pid") != os.getpid() and not _same_job_requeued(self.path):
                os.close(fd)
                raise RunLocked(f"run folder {self.path.parent} is in use: {_describe(self.path)} (this file "
                                f"system has no locks; if that process is gone, delete {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder named: the lock is free (the flock goes with the close)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
