"""One process at a time per stage and output: an exclusive, non-blocking flock on a lock file.

Two `tiles` (or `features`, `distill`, `embed`) runs on one output would both do all the work and
write the same shards; the second is refused at once instead, naming the first. flock rather than a
pid file: the kernel drops the lock when its process ends, however it ends, so a lock left behind by
a killed run never blocks the next one. The file itself only says who holds it, for the message.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import PathdistillError


class LockedError(PathdistillError, RuntimeError):
    """Another process holds the lock of the stage and output this run needs."""


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold ``lock_file`` for the block, or raise LockedError naming its holder (pid, host, command)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a+") as file:  # "a+": the holder's record stays readable until we hold the lock
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            raise LockedError(
                f"{lock_file} is held by {_describe(file.read())}, which is running the same stage on the same output: "
                "wait for it to finish, or stop it (a lock whose process has ended is released by itself)"
            ) from None
        file.truncate(0)
        file.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }) + "\n")
        file.flush()
        yield


def _describe(record: str) -> str:
    try:
        holder = json.loads(record)
    except ValueError:  # the holder has not written its record yet
        return "another process"
    return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']}: {holder['command']})"
