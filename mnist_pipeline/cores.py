"""CPU cores shared between the pipeline's runs on one machine: each holds the cores it runs threads on.

OpenMP threads meet at the end of every operation and spin while they wait. Two trainings that
each run a thread per core on the same cores keep preempting each other's threads, and both
crawl: on 2 cores, two 2-thread trainings ran at 58 steps/s each, against 300 for one alone. So a
training reserves as many cores as it runs threads before its first step (evaluate and export
do the same for their few seconds of work), waits while other runs hold them, and gives them
back when it ends. N trainings on C cores then take turns at full speed instead of crawling
together. The thread count itself is never lowered to fit: in fp32 the results depend on it,
and the same params must give the same bytes.

Reservations are advisory file locks (flock) in a per-user folder under the temporary
directory. The kernel drops the locks of a process that dies, even by `kill -9`.
"""

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

if sys.platform != "win32":
    import fcntl

POLL_SECONDS = 0.05


def machine_cores() -> int:
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_needed(device_type: str, threads: int) -> int:
    """The CPU cores one training process keeps busy: one per thread on the CPU, one to drive a GPU."""
    return threads if device_type == "cpu" else 1


def locks_folder() -> Path:
    """Where every run of this user on this machine keeps its core reservations."""
    return Path(tempfile.gettempdir()) / f"mnist-pipeline-cores-{os.getuid()}"


@contextmanager
def reserved_cores(count: int, folder: Path | None = None) -> Iterator[None]:
    """Hold `count` of this machine's cores (at most all of them) while the block runs.

    Waits, and says so once, while other runs hold them. One waiter at a time gathers
    cores, so two waiters never each hold half of what both need.
    """
    if sys.platform == "win32":  # no flock, so nothing to coordinate with
        yield
        return
    folder = folder or locks_folder()
    folder.mkdir(parents=True, exist_ok=True)
    cores = machine_cores()
    count = min(count, cores)
    with ExitStack() as held:
        queue = held.enter_context(open(folder / "queue.lock", "a"))
        announced = False
        if not _try_flock(queue):
            print("waiting for CPU cores: other runs of the pipeline are waiting for them too", flush=True)
            announced = True
            fcntl.flock(queue, fcntl.LOCK_EX)
        taken: set[int] = set()
        while True:
            busy = []
            for core in sorted(set(range(cores)) - taken):
                if len(taken) == count:
                    break
                if lock := _lock_core(folder / f"core-{core}.lock"):
                    held.enter_context(lock)
                    taken.add(core)
                else:
                    busy.append(core)
            if len(taken) == count:
                break
            if not announced:
                holders = "; pid ".join(sorted({(folder / f"core-{core}.lock").read_text() for core in busy}))
                print(
                    f"waiting for {count} free CPU cores: other runs of the pipeline hold them (pid {holders})",
                    flush=True,
                )
                announced = True
            time.sleep(POLL_SECONDS)
        fcntl.flock(queue, fcntl.LOCK_UN)
        yield


def _try_flock(file: IO) -> bool:
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_core(path: Path) -> IO | None:
    """The core's lock file, locked and naming this process and its folder; None if another process holds it."""
    file = open(path, "a+")  # noqa: SIM115 (the caller closes it, which releases the lock)
    if not _try_flock(file):
        file.close()
        return None
    file.truncate(0)
    file.write(f"{os.getpid()} in {os.getcwd()}")
    file.flush()
    return file
