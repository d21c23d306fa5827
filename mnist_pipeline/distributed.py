"""Training as several processes (ranks), each taking its share of every batch, launched by torchrun.

With train.nproc above 1, the train stage launches itself through torch.distributed.run, the
module behind the `torchrun` command: torchrun starts train.nproc workers on this machine, each
running the same stage with RANK, WORLD_SIZE and LOCAL_RANK in its environment. Each worker joins
the process group (gloo on the CPU, NCCL on CUDA with one GPU per rank), trains its share of each
batch and averages its gradients with the other ranks' (see training.train). Rank 0 alone writes the outputs.

Several machines: train.nnodes (a param, since the number of ranks changes the float sums and
so the bytes of the result) and two settings of the environment, torchrun's own under our
names, since they differ from machine to machine:
    MNIST_NODE_RANK      this machine's place among them, 0 to nnodes - 1; machine 0 holds rank 0,
                         so it writes the outputs: run `dvc exp run` or `dvc repro` there
    MNIST_RDZV_ENDPOINT  host:port on machine 0 where the ranks meet (torchrun's static rendezvous)
"""

import ctypes
import hashlib
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from mnist_pipeline.cores import cores_needed, machine_cores, reserved_cores
from mnist_pipeline.params import TrainParams
from mnist_pipeline.stage import FailureReported, PipelineError, is_rank, remove_output

# A rank that fails because of another waits this long for torchrun to stop it: a rank that dies
# breaks every other rank's next collective at once, and only the dead rank's failure is worth reporting.
PEER_FAILURE_GRACE_SECONDS = 30
PR_SET_PDEATHSIG = 1  # prctl(2)


@dataclass(frozen=True)
class Cluster:
    """Where this machine stands among the train.nnodes machines that train together (see the module's docstring)."""

    node_rank: int
    endpoint: str | None  # host:port; None on one machine, where torchrun picks a free loopback port


def cluster(params: TrainParams) -> Cluster:
    """This machine's multi-machine settings from the environment, checked; none are needed on one machine."""
    if params.nnodes == 1:
        return Cluster(0, None)
    node_rank = _environment_int("MNIST_NODE_RANK", 0, 0, params.nnodes - 1)
    endpoint = os.environ.get("MNIST_RDZV_ENDPOINT") or None
    if endpoint is None:
        raise PipelineError(
            f"params.yaml: train.nnodes is {params.nnodes}, so MNIST_RDZV_ENDPOINT must be machine 0's host:port"
        )
    if not re.fullmatch(r"[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+", endpoint):
        raise PipelineError(f"MNIST_RDZV_ENDPOINT must be host:port, got {endpoint!r}")
    return Cluster(node_rank, endpoint)


def _environment_int(name: str, default: int, low: int, high: int) -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or not low <= int(value) <= high:
        raise PipelineError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def launches_ranks(params: TrainParams) -> bool:
    """Whether this process is to launch ranks through torchrun rather than train (see launch)."""
    return not is_rank() and params.nproc * params.nnodes > 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks training together: (0, 1) in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def check_launch(params: TrainParams, device: torch.device) -> None:
    """Refuse a process count that `device` cannot take: one GPU per rank, one core or more per rank on the CPU."""
    if device.type == "cuda":
        if device.index is not None:
            raise PipelineError(
                f"params.yaml: train.device names one GPU ({device}) but train.nproc is {params.nproc}: "
                "use device cuda or auto, and each rank takes a GPU of its own"
            )
        if params.nproc > torch.cuda.device_count():
            raise PipelineError(
                f"params.yaml: train.nproc is {params.nproc} but this machine has {torch.cuda.device_count()} "
                "CUDA devices (one per process)"
            )
    elif device.type != "cpu":
        raise PipelineError(f"params.yaml: train.nproc above 1 needs a cpu or cuda device, not {device.type}")
    elif params.nproc > machine_cores():
        raise PipelineError(
            f"params.yaml: train.nproc is {params.nproc} but this machine has {machine_cores()} cores "
            "(each process needs one)"
        )


def launch(params: TrainParams, device: torch.device, module: str, arguments: list[str], outputs: list[Path]) -> None:
    """Run `python -m module arguments` as params.nproc ranks on this machine through torchrun, and wait.

    The ranks share train.num_threads (0: torch's default, a thread per core) and the cores are
    reserved for all of them at once (see cores.py). If a rank fails, torchrun stops the others;
    `outputs` are removed and the failure is one line naming the rank.
    """
    check_launch(params, device)
    nodes = cluster(params)
    threads = max(1, (params.num_threads or torch.get_num_threads()) // params.nproc)
    cores = params.nproc * cores_needed(device.type, threads)
    # OpenMP in each worker reads this; torchrun itself would set 1 and warn.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if nodes.endpoint is None:
        rendezvous = ["--standalone"]  # a free port on loopback
    else:
        rendezvous = ["--nnodes", str(params.nnodes), "--node-rank", str(nodes.node_rank)]
        rendezvous += ["--rdzv-backend", "static", "--rdzv-endpoint", nodes.endpoint]
        print(
            f"machine {nodes.node_rank} of {params.nnodes}: meeting the others at {nodes.endpoint} "
            "(torchrun waits up to 10 minutes)",
            flush=True,
        )
    # torchrun's error files go to a folder of ours, removed afterwards, instead of a new /tmp folder per run.
    with tempfile.TemporaryDirectory(prefix="mnist-torchrun-") as logs, reserved_cores(cores):
        ranks = ["--nproc-per-node", str(params.nproc), "--max-restarts", "0", "--log-dir", logs]
        torchrun = torch.distributed.run.parse_args([*rendezvous, *ranks, "--module", module, *arguments])
        logging.disable(logging.CRITICAL)  # torchrun's agent logs each rank it stops; the one line below says it
        # While the machines meet, this process waits inside torch's C++ store, where a Python signal
        # handler never runs: let SIGINT and SIGTERM end it at once (nothing is written yet). Once the
        # ranks start, torchrun handles both, passes them on to the ranks, and raises SignalException.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            torch.distributed.run.run(torchrun)
        except ChildFailedError as failed:
            for output in outputs:
                remove_output(output)
            raise _report(failed.failures, params.nproc * params.nnodes) from None
        except SignalException as stopped:  # torchrun has passed the signal on to the ranks and waited for them
            for output in outputs:
                remove_output(output)
            raise KeyboardInterrupt(signal.Signals(stopped.sigval)) from None
        except torch.distributed.DistError as error:
            raise PipelineError(f"MNIST_RDZV_ENDPOINT {nodes.endpoint}: the ranks could not meet ({error})") from None
        finally:
            logging.disable(logging.NOTSET)


def _report(failures: dict[int, ProcessFailure], world: int) -> Exception:
    """What to raise for the failed ranks: the first rank that failed on its own, not one stopped because of it.

    A rank that exits with 1 has printed its one line (or a bug's traceback) already. A rank
    killed by a signal printed nothing. Ranks that exit 128 + N were stopped by signal N: by
    torchrun, once another rank failed, or from outside.
    """

    def cause(rank: int) -> tuple[int, int]:
        code = failures[rank].exitcode
        return (0 if code == 1 else 1 if code < 0 else 2, failures[rank].timestamp)

    rank = min(failures, key=cause)
    code = failures[rank].exitcode
    if code == 1:
        return FailureReported()
    if code < 0:
        reason = f"killed by {failures[rank].signal_name()}"
    elif code > 128 and code - 128 in signal.valid_signals():
        reason = f"stopped by {signal.Signals(code - 128).name}"
    else:
        reason = f"exited with code {code}"
    return PipelineError(f"rank {rank} of {world}: {reason}")


@contextmanager
def process_group(params: TrainParams, device: torch.device, settings: str) -> Iterator[torch.device]:
    """Join the other ranks for the block: yields this rank's device (its own GPU on CUDA).

    `settings` (the params, as text) must be the same on every rank: machines that train
    together from different params would silently train something else.
    """
    die_with_launcher()
    local_ranks = int(os.environ["LOCAL_WORLD_SIZE"])
    if local_ranks != params.nproc:
        raise PipelineError(
            f"params.yaml: train.nproc is {params.nproc} but torchrun started {local_ranks} processes on this machine"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = attempt_store()
    if store is None:
        torch.distributed.init_process_group(backend)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world)
    digest = int.from_bytes(hashlib.sha256(settings.encode()).digest()[:7], "big")
    extremes = torch.tensor([digest, -digest], device=device)
    torch.distributed.all_reduce(extremes, torch.distributed.ReduceOp.MAX)
    if extremes.tolist() != [digest, -digest]:  # each machine's local rank 0 says so
        if os.environ["LOCAL_RANK"] != "0":
            raise FailureReported()
        raise PipelineError(
            "params.yaml: the machines training together have different params; check out the same ones"
        )
    try:
        yield device
    except (RuntimeError, FailureReported) as error:
        # A failure that another rank has, or reports: one that died breaks this rank's collectives,
        # and rank 0 says why the ranks all stopped (see training.stop_if_diverged). Ending now could
        # get that rank stopped before it ends or speaks, so wait: torchrun stops this rank (SIGTERM,
        # a KeyboardInterrupt here) once the other has ended.
        time.sleep(PEER_FAILURE_GRACE_SECONDS)
        if isinstance(error, torch.distributed.DistError) or "gloo" in str(error):
            # Still running: the rank that ended was on another machine, whose torchrun reports it.
            reason = re.sub(r"^\[[^\]]*\] ", "", str(error).splitlines()[0]).split(". ")[0]  # gloo's source line off
            raise PipelineError(f"lost the other ranks ({reason})") from None
        raise
    torch.distributed.destroy_process_group()


def attempt_store() -> torch.distributed.Store | None:
    """torchrun's store, with keys of this attempt's own; None where torchrun's agent does not serve one.

    torchrun keeps its store through the restarts that --max-restarts allows, so the ranks of a restart
    would find the addresses that the ranks before them left there, and gloo would connect to a dead
    rank (measured: "connectFullMesh failed ... Connection refused" in 1 restart of 2).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def die_with_launcher() -> None:
    """Have the kernel stop this rank (SIGTERM) if its launcher dies, even by `kill -9` (Linux only):
    a rank left running would go on to write outputs that a rerun is writing too."""
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform == "linux" else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the launcher died before the call above
            raise KeyboardInterrupt(signal.SIGTERM)
