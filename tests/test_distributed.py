"""Data-parallel training through torchrun (train.nproc), run as a user runs it: the train stage's own
command and `dvc exp run`, in a copy of the project on synthetic data, with real ranks on loopback."""

import dataclasses
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import pytest
import torch
from conftest import (
    COMMAND_TIMEOUT,
    TRAIN_PARAMS,
    copy_project,
    run,
    set_params,
    stage_command,
    started,
    synthetic_split,
    train_outputs,
    training,
    user_environment,
)

from mnist_pipeline import training as training_module
from mnist_pipeline.cores import machine_cores
from mnist_pipeline.data import to_tensors
from mnist_pipeline.distributed import cluster
from mnist_pipeline.model import MLP
from mnist_pipeline.params import AugmentParams
from mnist_pipeline.resume import STATE_FOLDER
from mnist_pipeline.stage import PipelineError
from mnist_pipeline.training import batch_loss

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' processes through /proc")
TWO_CORES = pytest.mark.skipif(machine_cores() < 2, reason="2 processes need 2 CPU cores, one each; this machine has 1")


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, synthetic_mirror):
    """A committed copy with the synthetic data downloaded, 3 epochs of batches that split unevenly,
    every deformation on (each rank deforms its share of the batch), and its mirror."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("distributed"), checksums)
    set_params(project, epochs=3, batch_size=63, lr=0.1)  # 63 = 32 + 31 images a rank
    set_params(project, "augment", rotation=10, scale=0.1, shear=5, translation=1, elastic_alpha=8, elastic_sigma=3)
    run(project, "dvc", "repro", "download", mirror=str(directory))
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "data")
    return project, str(directory)


def train(project: Path, check: bool = True, **params: object) -> subprocess.CompletedProcess:
    """Run the train stage's command with these train params; return the finished process."""
    set_params(project, **params)
    try:
        return run(project, *stage_command(project, "train"), check=check)
    finally:
        run(project, "git", "checkout", "--", "params.yaml")


def checkpoint(project: Path) -> dict:
    return torch.load(project / "models" / "checkpoint.pt", weights_only=True)


def results_of(
    project: Path, result: subprocess.CompletedProcess
) -> tuple[dict, dict[str, bytes], str, subprocess.CompletedProcess]:
    """The checkpoint, the bytes of the outputs and the per-epoch loss table a run left, and the run."""
    steps = (project / "metrics" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    return checkpoint(project), train_outputs(project), steps, result


@pytest.fixture(scope="module")
def one_and_two_processes(downloaded):
    """What 1 process (the train stage's command) and 2 left (`dvc exp run -S train.nproc=2`, as a user
    starts them), and `dvc exp show` and `dvc status` right after the experiment. The copy's params and
    lock are then the committed ones again, for the tests that follow."""
    project, mirror = downloaded
    one = results_of(project, train(project, nproc=1))
    two = results_of(project, run(project, "dvc", "exp", "run", "-S", "train.nproc=2", mirror=mirror))
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    status = run(project, "dvc", "status").stdout
    run(project, "git", "checkout", "--", "params.yaml", "dvc.lock")
    return one, two, shown, status


@TWO_CORES
def test_two_processes_write_the_bytes_of_one_and_rank_0_alone_writes(one_and_two_processes):
    """The same batches, split unevenly (32 + 31 images), every deformation on, and the same bytes: the
    checkpoint, DVCLive's figures and curves (the loss of each batch as one process computes it), the picture."""
    (one, one_outputs, _, _), (_, two_outputs, steps, result), _, _ = one_and_two_processes
    assert two_outputs == one_outputs
    assert "nproc" not in one["train_params"]  # how a training runs is not what it computes (params.py)
    assert one["train_params"]["augment"]["elastic_alpha"] == 8  # the copy's augmentation, recorded
    assert json.loads(one_outputs["metrics/train"]["metrics.json"])["test"]["accuracy"] > 0.9
    # Rank 0 alone talks and logs: one start line, one row per epoch (and epoch 0).
    [start] = [line for line in result.stdout.splitlines() if line.startswith("training on")]
    assert re.fullmatch(
        r"training on cpu x 2 processes \(fp32 portable, \d+ threads?\): "
        r"600 images, 3 epochs, batch 63, sgd lr 0.1 constant",
        start,
    )
    assert [row.split("\t")[0] for row in steps.splitlines()] == ["step", "0", "1", "2", "3"]
    assert "error" not in result.stderr and "Traceback" not in result.stderr


def rank_pid(launcher: int, rank: int) -> int:
    """The process of `rank` among those that torchrun started for the stage process `launcher`."""
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"\nPPid:\t{launcher}\n" in status and f"RANK={rank}".encode() in environment:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under process {launcher}")


@TWO_CORES
@pytest.mark.parametrize(
    ("target", "sent", "code", "line"),
    [
        ("rank 1", signal.SIGKILL, 1, "error: rank 1 of 2: killed by SIGKILL"),
        ("launcher", signal.SIGTERM, 143, "interrupted (SIGTERM)"),
    ],
)
def test_a_killed_rank_ends_the_stage_with_one_line_and_no_outputs(downloaded, target, sent, code, line):
    project, _ = downloaded
    with training(project, nproc=2, epochs=500) as process:
        os.kill(process.pid if target == "launcher" else rank_pid(process.pid, int(target[-1])), sent)
        _, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    assert process.returncode == code
    lines = [text for text in stderr.replace("\r", "\n").splitlines() if text and not text.startswith("train:")]
    assert lines == [line]
    assert not (project / "models" / "checkpoint.pt").exists()
    assert not (project / "metrics" / "train").exists()


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return "\nState:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False


@TWO_CORES
def test_the_ranks_end_with_their_launcher_even_after_sigkill(downloaded):
    project, _ = downloaded
    with training(project, nproc=2, epochs=500) as process:
        ranks = [rank_pid(process.pid, rank) for rank in (0, 1)]
        process.kill()
        process.communicate(timeout=COMMAND_TIMEOUT)
        for _ in range(1200):  # the kernel sends them SIGTERM at once; allow 2 minutes on a loaded machine
            if not any(map(running, ranks)):
                break
            time.sleep(0.1)
        assert not any(map(running, ranks))
    assert not (project / "models" / "checkpoint.pt").exists()
    assert not (project / "metrics" / "train").exists()


@TWO_CORES
def test_a_diverging_distributed_training_is_one_line_from_rank_0(downloaded):
    project, _ = downloaded
    result = train(project, check=False, nproc=2, lr=1000)
    assert result.returncode == 1
    [error] = [text for text in result.stderr.splitlines() if text.startswith("error")]
    assert error.startswith("error: rank 0 of 2: params.yaml: training diverged at epoch 1, step ")
    assert "Traceback" not in result.stderr
    assert not (project / "models" / "checkpoint.pt").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@TWO_CORES
def test_two_machines_of_two_processes_write_the_bytes_of_one_process(downloaded, one_and_two_processes, tmp_path):
    """Two "machines" on loopback, two processes each: machine 0 writes, bit for bit, what one process
    writes (whatever their thread counts: the arithmetic is portable); machine 1, given paths of its own,
    writes nothing."""
    project, _ = downloaded
    one_process = one_and_two_processes[0][1]
    (project / "models" / "checkpoint.pt").unlink(missing_ok=True)
    set_params(project, nproc=2, nnodes=2, num_threads=2)
    command = stage_command(project, "train")
    outputs = tmp_path / "outputs"
    elsewhere = [str(outputs / "checkpoint.pt") if arg == "models/checkpoint.pt" else arg for arg in command]
    elsewhere = [str(outputs / "train") if arg == "metrics/train" else arg for arg in elsewhere]
    # Machine 1's own temporary folder, as on another machine: its core reservations are its own
    # (see cores.py), so it never waits behind other runs here while machine 0 waits for it.
    (tmp_path / "tmp").mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    machines = {"MNIST_RDZV_ENDPOINT": endpoint}
    nodes = [
        subprocess.Popen(
            arguments,
            cwd=project,
            env=user_environment(**machines, **variables),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for arguments, variables in (
            (command, {"MNIST_NODE_RANK": "0"}),
            (elsewhere, {"MNIST_NODE_RANK": "1", "TMPDIR": str(tmp_path / "tmp")}),
        )
    ]
    try:
        printed = [node.communicate(timeout=COMMAND_TIMEOUT) for node in nodes]
    finally:  # neither machine is left waiting for the other
        for node in nodes:
            with suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        run(project, "git", "checkout", "--", "params.yaml")
    assert [node.returncode for node in nodes] == [0, 0], printed
    assert "training on cpu x 4 processes" in printed[0][0]
    assert train_outputs(project) == one_process
    assert not outputs.exists() and "training on" not in printed[1][0]


@TWO_CORES
def test_dvc_exp_run_trains_with_two_processes(one_and_two_processes):
    _, _, shown, status = one_and_two_processes
    [experiment] = [exp for commit in shown for exp in commit.get("experiments") or []]
    [revision] = experiment["revs"]
    data = revision["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["nproc"] == 2
    assert data["metrics"]["metrics/eval.json"]["data"]["accuracy"] > 0.9
    assert "Data and pipelines are up to date." in status


@TWO_CORES
def test_ranks_that_torchrun_restarts_resume_from_the_last_epoch(downloaded):
    """The user's own torchrun, allowed a restart, and rank 1 killed (SIGKILL) once epoch 2 is logged:
    torchrun stops rank 0 and starts both again, which go on from the epoch rank 0 saved last and end
    with the bytes of one process's uninterrupted training."""
    project, _ = downloaded
    epochs = 12  # of 10 steps each: the kill lands with epochs to spare
    train(project, nproc=1, epochs=epochs)
    uninterrupted = train_outputs(project)
    set_params(project, nproc=2, epochs=epochs)
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--module"]
    try:
        with started(project, [*torchrun, *stage_command(project, "train")[2:]], until="epoch 2:") as process:
            os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        run(project, "git", "checkout", "--", "params.yaml")
    assert process.returncode == 0, stderr
    [resumed] = [line for line in stdout.splitlines() if line.startswith("resuming after epoch ")]
    assert resumed.endswith(f" of {epochs}: an interrupted run saved it")
    assert train_outputs(project) == uninterrupted
    assert not list((project / STATE_FOLDER).glob("*"))


DEFORMED = AugmentParams(rotation=10, scale=0.1, shear=5, translation=1, elastic_alpha=8, elastic_sigma=3)


def small_training(report_rows: bool) -> dict[str, torch.Tensor]:
    """The weights of a short AdamW training on synthetic data in this process, or in this rank of the
    process group; `report_rows`: whether this process reports (the one, or rank 0)."""
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    params = dataclasses.replace(
        TRAIN_PARAMS, optimizer="adamw", lr=0.01, label_smoothing=0.1, schedule="onecycle", epochs=2, batch_size=64
    )
    torch.manual_seed(1)
    model = MLP([64, 32])
    training_module.train(model, images, labels, params, DEFORMED, (lambda row: None) if report_rows else None)
    return model.state_dict()


def rank_of_small_training(rank: int, store: str, saved: str) -> None:
    """A rank of 2 in a process of its own: small_training as the project runs it, then with each rank
    rounding its share of a batch to grids of its own (as before whole-batch grids); rank 0 saves both."""
    torch.set_num_threads(1)  # a core each, as torchrun gives them (two ranks of 2 threads each on 2 cores crawl)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    whole_batch = small_training(rank == 0)
    training_module.grids_of_the_whole_batch = lambda ranks: nullcontext()
    own_grids = small_training(rank == 0)
    if rank == 0:
        torch.save({"whole batch": whole_batch, "own grids": own_grids}, saved)
    torch.distributed.destroy_process_group()


@TWO_CORES
def test_ranks_rounding_to_the_whole_batchs_grids_train_the_bits_of_one_process(tmp_path):
    """Two ranks (processes of their own, gloo on loopback) train the weights of one process, bit for bit;
    the negative control: with each rank's share on grids of its own, they do not."""
    one_process = small_training(report_rows=True)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter, as torchrun starts
    ranks = [
        spawn.Process(target=rank_of_small_training, args=(rank, str(tmp_path / "store"), str(tmp_path / "w.pt")))
        for rank in range(2)
    ]
    for rank in ranks:
        rank.start()
    try:
        for rank in ranks:
            rank.join(COMMAND_TIMEOUT)
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.exitcode for rank in ranks] == [0, 0]
    saved = torch.load(tmp_path / "w.pt", weights_only=True)

    def same(weights: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(weights[name], one_process[name]) for name in one_process)

    assert same(saved["whole batch"])
    assert not same(saved["own grids"])


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({}, "params.yaml: train.nnodes is 2, so MNIST_RDZV_ENDPOINT must be machine 0's host:port"),
        (
            {"MNIST_NODE_RANK": "2", "MNIST_RDZV_ENDPOINT": "a:1"},
            "MNIST_NODE_RANK must be an integer from 0 to 1, got '2'",
        ),
        ({"MNIST_RDZV_ENDPOINT": "host"}, "MNIST_RDZV_ENDPOINT must be host:port, got 'host'"),
    ],
)
def test_bad_cluster_settings_name_the_variable(monkeypatch, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError) as error:
        cluster(dataclasses.replace(TRAIN_PARAMS, nnodes=2))
    assert str(error.value) == message


@pytest.mark.parametrize(("batch", "world"), [(5, 2), (7, 3), (2, 4)])
def test_shares_of_an_unevenly_split_batch_average_to_the_batch_mean(batch, world):
    """The ranks average their gradients: the shares (rank r takes every world-th image, some
    none) must average to the whole batch's mean loss, and so to its gradient."""
    torch.manual_seed(0)
    logits, labels = torch.randn(batch, 10), torch.randint(0, 10, (batch,))
    whole = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    shares = [
        batch_loss(logits[rank::world], labels[rank::world], batch, world, label_smoothing=0.1) for rank in range(world)
    ]
    torch.testing.assert_close(sum(shares) / world, whole)
    assert batch_loss(logits, labels, batch, 1, 0.1).equal(whole)  # one process: the plain mean, bit for bit
