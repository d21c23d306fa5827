"""CPU cores shared between the pipeline's runs on one machine: each holds the cores it runs threads on.

OpenMP threads meet at the end of every operation and spin while they wait. Two trainings that
each run a thread per core on the same cores keep preempting each other's threads, and both
crawl: on 2 cores, two 2-thread trainings ran at 58 steps/s each, against 300 for one alone. So a
training reserves as many cores as it runs threads before its first step (evaluate and export
do the same for their few seconds of work), waits while other runs hold them, and gives them
back when it ends. N trainings on C cores then take turns at full speed instead of crawling
together. Other programs do not reserve cores: a portable training measures what they leave free
(FreeCores) and runs as many threads as that, whose count changes no bit in its arithmetic.

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
MIN_INTERVAL = 0.25  # seconds over which FreeCores averages at the least: several of the kernel's 10 ms ticks


def machine_cores() -> int:
    """The number of cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class FreeCores:
    """The cores that other processes leave to this one, measured from one call of `count` to the next by
    Linux's CPU time counters: the busy time of this process's CPUs (/proc/stat) less its own.

    Beside a busy process, OpenMP threads that share its cores wait for each other at every barrier
    and a training crawls; with no more threads than free cores it keeps its pace on its share.
    """

    def __init__(self) -> None:
        self.cores = machine_cores()
        self.previous = _cpu_seconds()
        self.counted = False

    def count(self) -> float | None:
        """Free cores, on average since the last count (the first time, what other processes run at this
        moment); None without Linux's counters, or if under MIN_INTERVAL seconds have passed since the
        last count (the interval then runs on to the next call)."""
        if self.previous is None:
            return None
        if not self.counted:
            self.counted = True
            return max(0.0, self.cores - _others_running())
        if time.monotonic() - self.previous[2] < MIN_INTERVAL:
            return None
        now = _cpu_seconds()
        busy, own, wall = (late - early for late, early in zip(now, self.previous, strict=True))
        self.previous = now
        return min(self.cores, max(0.0, self.cores - (busy - own) / wall))


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(seconds of work on this process's CPUs, by every process; seconds of this process's own; a
    monotonic clock's seconds), or None where /proc/stat is not there to read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    cpus = {f"cpu{core}" for core in os.sched_getaffinity(0)}
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in cpus:  # user nice system idle iowait irq softirq steal ...: all but idle and iowait
            ticks += sum(int(value) for value in fields[:3] + fields[5:8])
    return ticks / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()


def _others_running(looks: int = 5) -> int:
    """Threads of other processes that are running or ready to run, the fewest of a few looks 2 ms apart,
    so that what runs only for a moment does not count."""
    counts = []
    for look in range(looks):
        time.sleep(0.002 if look else 0)
        counts.append(_others_running_now())
    return min(counts)


def _others_running_now() -> int:
    """Threads of other processes running or ready to run at this moment (Linux's procs_running, which
    counts every running thread, less this process's own)."""
    running = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("procs_running")
    )
    own = sum(1 for task in Path("/proc/self/task").iterdir() if _task_state(task) == "R")
    return max(0, running - own)


def _task_state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # the thread ended meanwhile
        return ""


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
