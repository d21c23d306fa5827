"""A training killed at any moment resumes from its last completed epoch when run again with the same
params, and ends with the bytes of a training never interrupted: run as a user runs it, in a copy of
the project on synthetic data, by the train stage's own command and through `dvc exp run` (with --temp)."""

import os
import random
import signal
import time

import numpy as np
import pytest
from conftest import (
    COMMAND_TIMEOUT,
    copy_project,
    remove_train_outputs,
    run,
    set_params,
    stage_command,
    started,
    train_outputs,
)

from mnist_pipeline.resume import STATE_FOLDER, discard_state, state_path

EPOCHS = 12  # of 10 steps each: a tenth of a second or so here


@pytest.fixture(scope="module")
def project(tmp_path_factory, synthetic_mirror):
    """A committed copy with the synthetic data downloaded (12 epochs, every deformation's generator in use),
    its mirror, and what an uninterrupted run of the train stage's command writes."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("resume"), checksums)
    set_params(project, epochs=EPOCHS, lr=0.05)
    set_params(project, "augment", rotation=10, scale=0.1, elastic_alpha=8, elastic_sigma=3)
    run(project, "dvc", "repro", "download", mirror=str(directory))
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "data")
    run(project, *stage_command(project, "train"))
    uninterrupted = train_outputs(project)
    assert not list((project / STATE_FOLDER).glob("*")), "an ended training left its state behind"
    remove_train_outputs(project)
    return project, str(directory), uninterrupted


def test_a_training_killed_by_each_signal_in_turn_ends_with_the_bytes_of_an_uninterrupted_one(project):
    """SIGTERM once epoch 2 has begun (so that epoch 1's state is saved), then Ctrl-C and SIGKILL once training
    has begun, each at a random moment up to 0.2 s later: every run but the first goes on from the state the
    last one saved, and the last ends as if nothing had happened."""
    project, _, uninterrupted = project
    command = stage_command(project, "train")
    chance = random.Random()
    kills = []
    for sent, until in ((signal.SIGTERM, "epoch 2:"), (signal.SIGINT, "training on"), (signal.SIGKILL, "training on")):
        pause = chance.uniform(0, 0.2)
        kills.append(f"{sent.name} {pause:.3f} s after {until!r}")
        with started(project, command, until=until) as process:
            time.sleep(pause)
            os.killpg(process.pid, sent)
            process.communicate(timeout=COMMAND_TIMEOUT)
        assert process.returncode != 0 and not (project / "models" / "checkpoint.pt").exists(), kills
    result = run(project, *command)
    resumed = [line for line in result.stdout.splitlines() if line.startswith("resuming after epoch ")]
    assert len(resumed) == 1 and resumed[0].endswith(f" of {EPOCHS}: an interrupted run saved it"), kills
    assert train_outputs(project) == uninterrupted, kills
    assert not list((project / STATE_FOLDER).glob("*")), kills


def test_a_killed_dvc_exp_run_resumes_in_a_temporary_copy(project):
    """`dvc exp run` killed as a closed laptop kills it (SIGKILL), then run again with --temp: in a copy of the
    workspace under .dvc/tmp/exps/, as a queued one runs, it finds the state (under DVC_ROOT, which
    tests/test_experiments.py shows a queued run gets too) and ends with the uninterrupted bytes; and DVC,
    killed mid-stage, sees a workspace up to date once the experiment is applied."""
    project, mirror, uninterrupted = project
    with started(project, ["dvc", "exp", "run"], until="epoch 2:", MNIST_MIRROR=mirror) as process:
        os.killpg(process.pid, signal.SIGKILL)
    assert len(list((project / STATE_FOLDER).glob("*.pt"))) == 1
    run(project, "git", "checkout", "--", ".")  # what DVC removed before the train stage ran
    result = run(project, "dvc", "exp", "run", "--temp", "-n", "resumed", mirror=mirror)
    assert "resuming after epoch " in result.stdout
    run(project, "dvc", "exp", "apply", "resumed")
    assert train_outputs(project) == uninterrupted
    assert not list((project / STATE_FOLDER).glob("*"))
    assert "Data and pipelines are up to date." in run(project, "dvc", "status").stdout


def test_a_state_belongs_to_its_params_data_and_code(tmp_path, monkeypatch):
    """A run of other params, data or code looks for its state elsewhere, and so never resumes another's."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    data = [np.zeros((3, 28, 28), np.uint8), np.arange(3, dtype=np.uint8)]
    code = [tmp_path / "code.py"]
    path = state_path("params", data, code)
    assert path.parent == tmp_path / STATE_FOLDER and path == state_path("params", data, code)
    changed = data[0].copy()
    changed[1, 2, 3] = 1
    others = [state_path("other params", data, code), state_path("params", [changed, data[1]], code)]
    (tmp_path / "code.py").write_text("x = 2\n")
    others.append(state_path("params", data, code))
    assert len({path, *others}) == 4
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))  # not a DVC project: nothing is saved
    assert state_path("params", data, code) is None


def test_an_ended_training_leaves_no_temporary_of_its_state(tmp_path):
    """A run killed while it wrote its state leaves atomic_output's temporary beside it: discarding the state
    removes that too, and nothing of another training's."""
    state = tmp_path / "abc.pt"
    others = [tmp_path / "other.pt", tmp_path / ".other.pt.7.tmp"]
    for path in [state, tmp_path / ".abc.pt.12345.tmp", *others]:
        path.write_bytes(b"x")
    discard_state(state)
    assert sorted(tmp_path.iterdir()) == sorted(others)
