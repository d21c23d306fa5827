import dataclasses
import itertools
import math
import re
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
from conftest import NO_AUGMENTATION, PROJECT, TRAIN_PARAMS, synthetic_split

from mnist_pipeline import training
from mnist_pipeline.data import to_tensors
from mnist_pipeline.model import MLP
from mnist_pipeline.optim import Optimizer
from mnist_pipeline.params import TrainParams
from mnist_pipeline.stage import PipelineError
from mnist_pipeline.training import (
    PROGRESS_EVERY,
    check_model_fits,
    configure_device,
    cpu_has_native_bf16,
    select_device,
    train,
)

BF16_CPU = cpu_has_native_bf16()


def fit(
    params: TrainParams = TRAIN_PARAMS, hidden_sizes: tuple[int, ...] = (64, 32), threads: list[int] | None = None
) -> tuple[MLP, list[dict]]:
    """A training on synthetic data: the model and its rows; the thread count at each row into `threads`."""
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    torch.manual_seed(params.seed)
    model = MLP(list(hidden_sizes))
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        if threads is not None:
            threads.append(torch.get_num_threads())

    train(model, images, labels, params, NO_AUGMENTATION, report)
    return model, rows


def test_auto_device_picks_what_this_machine_has():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_cuda_device_is_a_clear_error():
    with pytest.raises(PipelineError, match="train.device is 'cuda' but this machine has no cuda device"):
        select_device("cuda")


def test_training_learns_and_reports_each_epoch_from_the_untrained_model_on():
    params = dataclasses.replace(TRAIN_PARAMS, schedule="onecycle")
    model, rows = fit(params)
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"epoch", "train/loss", "train/accuracy", "lr"}
    assert rows[0]["train/loss"] == pytest.approx(math.log(10), rel=0.1)  # untrained: about uniform
    assert rows[-1]["train/loss"] < rows[1]["train/loss"] < rows[0]["train/loss"]
    assert rows[-1]["train/accuracy"] > 0.9  # each class has its own bright patch
    # The first step's learning rate, then each epoch's last: one-cycle warms up, then anneals.
    schedule = Optimizer([], params, 30)
    assert [row["lr"] for row in rows] == [schedule.lr_at(step) for step in (0, 9, 19, 29)]
    assert not model.training


def test_same_seed_same_weights_other_seed_other_weights():
    first, rows = fit()
    second, again = fit()
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert rows == again
    other, _ = fit(dataclasses.replace(TRAIN_PARAMS, seed=2))
    assert not torch.equal(first.layers[0].weight, other.layers[0].weight)


def weights_at_1_2_and_3_threads(arithmetic: str) -> list[dict[str, torch.Tensor]]:
    """The weights of a short training at the pipeline's widths and batch on 1, 2 and 3 threads, each count
    pinned (train.num_threads; 0 would fit it to the free cores) and checked at every epoch's report."""
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            params = dataclasses.replace(
                TRAIN_PARAMS, batch_size=64, epochs=2, lr=0.01, arithmetic=arithmetic, num_threads=count
            )
            counts: list[int] = []
            model, _ = fit(params, (520, 320, 240, 120), counts)
            assert counts == [count] * 3  # epoch 0 and the two epochs ran on `count` threads
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(threads)
    return weights


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


def test_one_two_and_three_threads_train_the_same_weights():
    """The portable arithmetic, where MKL would split its products among the threads."""
    one, *others = weights_at_1_2_and_3_threads("portable")
    assert all(same_weights(one, other) for other in others)


def test_the_thread_count_changes_the_native_arithmetic():
    """The negative control of the test above: torch's own products give other weights at another count
    (measured on the AMD EPYC Zen 5: 1 and 2 threads differ)."""
    one, *others = weights_at_1_2_and_3_threads("native")
    if all(same_weights(one, other) for other in others):
        pytest.skip("this CPU's native products give the same bits on 1, 2 and 3 threads at these shapes")


def test_threads_follow_the_free_cores_at_every_readout_and_change_no_bit(monkeypatch, capsys):
    """A portable training fits its thread count to the cores other processes leave free, up to what it
    started with; its weights are those of a training on a fixed thread count."""
    threads_used = []

    class BusyMachine:  # 3 cores, of which other processes leave these free, look after look
        cores = 3
        free = itertools.cycle([0.7, 1.6, 1.4, 3.0])

        def count(self) -> float:
            threads_used.append(torch.get_num_threads())
            return next(self.free)

    params = dataclasses.replace(TRAIN_PARAMS, batch_size=32, epochs=3)  # 10 steps an epoch: a look at each end
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fixed, _ = fit(dataclasses.replace(params, num_threads=2), (520, 320, 240, 120))
        monkeypatch.setattr(training, "FreeCores", BusyMachine)
        torch.set_num_threads(3)
        adapted, _ = fit(params, (520, 320, 240, 120))
        assert torch.get_num_threads() == 3  # the count it started with, for what the process runs next
    finally:
        torch.set_num_threads(threads)
    assert threads_used == [3, 1, 2, 1]  # before the first test pass, then at the end of each epoch
    assert "1 thread from here: other processes keep 2.3 of 3 cores busy" in capsys.readouterr().out
    for a, b in zip(fixed.state_dict().values(), adapted.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "adamw", "lr": 0.003, "schedule": "onecycle", "weight_decay": 0.01},
        {"arithmetic": "native"},
        pytest.param(
            {"precision": "bf16", "arithmetic": "native"},
            marks=pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bf16"),
        ),
    ],
)
def test_other_recipes_learn_too(changes):
    _, rows = fit(dataclasses.replace(TRAIN_PARAMS, **changes))
    assert rows[-1]["train/accuracy"] > 0.9


def test_num_threads_is_applied_and_bf16_needs_native_arithmetic_and_cpu_support(monkeypatch):
    threads = torch.get_num_threads()
    try:
        configure_device(dataclasses.replace(TRAIN_PARAMS, num_threads=1), torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(PipelineError, match="train.precision bf16 runs this machine's own bf16 kernels, .* native"):
        configure_device(dataclasses.replace(TRAIN_PARAMS, precision="bf16"), torch.device("cpu"))
    # This CPU as one without bf16 instructions, whatever its architecture calls them.
    capabilities = {
        name: present and not name.endswith("bf16") for name, present in torch.cpu.get_capabilities().items()
    }
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    with pytest.raises(PipelineError, match="train.precision is bf16 but this CPU has no native bf16 support"):
        configure_device(dataclasses.replace(TRAIN_PARAMS, precision="bf16", arithmetic="native"), torch.device("cpu"))


class FailsAtCall(MLP):
    """An MLP whose `failing_call`-th training forward pass (counted from 1) returns NaN logits."""

    def __init__(self, failing_call: int) -> None:
        super().__init__([32])
        self.calls = 0
        self.failing_call = failing_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if not torch.is_grad_enabled():  # an evaluation, not a training step
            return logits
        self.calls += 1
        return logits * float("nan") if self.calls == self.failing_call else logits


@pytest.mark.parametrize(
    ("failing_call", "epoch", "step"),
    # 320 images in batches of 32: 10 steps an epoch. PROGRESS_EVERY is 100, so the divergence is
    # found at a readout after it, and still named at the step where it happened.
    [(1, 1, 1), (7, 1, 7), (10, 1, 10), (11, 2, 1), (105, 11, 5), (PROGRESS_EVERY + 1, 11, 1)],
)
def test_a_nan_loss_stops_training_naming_the_epoch_step_and_learning_rate(failing_call, epoch, step):
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    model = FailsAtCall(failing_call)
    params = dataclasses.replace(TRAIN_PARAMS, epochs=20, lr=0.02, schedule="onecycle")
    with pytest.raises(PipelineError) as error:
        train(model, images, labels, params, NO_AUGMENTATION, lambda row: None)
    lr = Optimizer([], params, 200).lr_at(failing_call - 1)
    assert str(error.value) == (
        f"params.yaml: training diverged at epoch {epoch}, step {step}: the loss is nan "
        f"(learning rate {lr:g}); lower train.lr"
    )
    assert model.calls < failing_call + PROGRESS_EVERY  # stopped at the first readout after it


def test_a_learning_rate_that_blows_up_stops_training_at_the_first_bad_step():
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    torch.manual_seed(1)
    with pytest.raises(PipelineError, match=r"diverged at epoch 1, step 2: the loss is nan \(learning rate 1e\+30\)"):
        train(
            MLP([32]), images, labels, dataclasses.replace(TRAIN_PARAMS, lr=1e30, momentum=0.0), NO_AUGMENTATION, print
        )


def train_on_shuffled_labels(lr: float, arithmetic: str) -> list[dict]:
    """Ten epochs of onecycle at peak `lr` on labels shuffled away from their images: nothing to learn, so
    the gradients stay large while the learning rate climbs. Returns the reported rows."""
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    params = dataclasses.replace(TRAIN_PARAMS, lr=lr, epochs=10, schedule="onecycle", arithmetic=arithmetic)
    torch.manual_seed(1)
    rows = []
    train(MLP([32]), images, labels, params, NO_AUGMENTATION, rows.append)
    return rows


@pytest.mark.parametrize("arithmetic", ["portable", "native"])
def test_a_loss_that_runs_away_stops_training_though_it_stays_finite(arithmetic):
    """At a peak of 4, the loss runs past 3 times the untrained model's once the learning rate has climbed,
    in the second epoch (portable: on every CPU); finite, so only its size tells."""
    with pytest.raises(PipelineError) as error:
        train_on_shuffled_labels(4.0, arithmetic)
    found = re.fullmatch(
        r"params.yaml: training diverged at epoch (\d+), step \d+: the loss is ([\d.]+), more than 3 times the "
        r"untrained model's (2\.3\d+) \(learning rate [\d.]+\); lower train.lr",
        str(error.value),
    )
    assert found, str(error.value)
    epoch, loss, untrained = int(found[1]), float(found[2]), float(found[3])
    assert loss > 3 * untrained and (epoch == 2 if arithmetic == "portable" else epoch >= 2)


def test_a_loss_that_rises_and_falls_again_is_not_stopped():
    """The negative control: at a peak of 2 the loss climbs above the untrained model's, not far, and comes back."""
    losses = [row["train/loss"] for row in train_on_shuffled_labels(2.0, "portable")]
    assert len(losses) == 11 and max(losses) > losses[0] * 1.05 and losses[-1] < max(losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_training_resumed_from_an_epochs_progress_ends_where_the_uninterrupted_one_does(optimizer):
    """The progress passed to snapshot after epoch 2 of 4, resumed in a new model and optimizer, gives the same
    weights and rows, bit for bit (onecycle, label smoothing, deformations: every state the steps read)."""
    images, labels = to_tensors(*synthetic_split(320, seed=0), torch.device("cpu"))
    params = dataclasses.replace(
        TRAIN_PARAMS, optimizer=optimizer, schedule="onecycle", label_smoothing=0.1, weight_decay=0.01, epochs=4
    )
    deformed = dataclasses.replace(NO_AUGMENTATION, rotation=10, elastic_alpha=8, elastic_sigma=3)

    def fresh() -> MLP:
        torch.manual_seed(1)
        return MLP([32])

    rows, saved = [], []
    uninterrupted = fresh()
    train(uninterrupted, images, labels, params, deformed, rows.append, snapshot=lambda p: saved.append(deepcopy(p)))
    assert [progress.epoch for progress in saved] == [1, 2, 3, 4]
    resumed_rows = []
    resumed = fresh()
    train(resumed, images, labels, params, deformed, resumed_rows.append, resume=saved[1])
    assert resumed_rows == rows[3:]
    for (name, weights), again in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(weights, again), name


def test_a_model_too_big_for_the_device_is_refused_before_allocating():
    # SGD with momentum: weights, gradients and one buffer (12 bytes a weight), and the products' rounded copies.
    params = TRAIN_PARAMS
    check_model_fits([520, 320, 240, 120], params, torch.device("cpu"))
    with pytest.raises(PipelineError) as error:
        check_model_fits([10**12], params, torch.device("cpu"))
    assert re.fullmatch(
        r"params.yaml: model.hidden_sizes \[1000000000000\] makes 795,000,000,000,010 weights, which need at "
        r"least 11,846,\d{3}.\d GiB to train; this cpu device has [\d,.]+ GiB",
        str(error.value),
    )


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt is glibc's")
def test_training_steps_reuse_freed_memory_instead_of_page_faulting():
    # A first training touches its memory for the first time; the second, with a new model of
    # the same size, is measured over 20 steps. Kept, its steps reuse what the first freed: 1 to 41
    # faults a step on the Zen 5 (Python's own allocator accounts for the rest). glibc left alone
    # raises its mmap threshold as blocks come and go, so its count wanders from run to run (50 to
    # 800 a step); pinned at its documented default of 128 KiB, it maps every large block afresh
    # each step: about 11,000 faults a step there, every run.
    steps = 20
    code = (
        "import ctypes, dataclasses, resource, sys, torch\n"
        "from mnist_pipeline.model import MLP\n"
        "from mnist_pipeline.params import AugmentParams, TrainParams\n"
        "from mnist_pipeline.training import M_MMAP_THRESHOLD, keep_freed_memory, train\n"
        "if sys.argv[1] == 'keep':\n"
        "    keep_freed_memory()\n"
        "else:\n"
        "    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 << 10)\n"
        f"params = dataclasses.replace({TRAIN_PARAMS!r}, batch_size=384, epochs=1)\n"
        "torch.manual_seed(0)\n"  # random labels, fixed: their loss never runs away (training.RUNAWAY_FACTOR)
        f"images = torch.randint(0, 256, (384 * {steps}, 784), dtype=torch.uint8)\n"
        f"labels = torch.randint(0, 10, (384 * {steps},))\n"
        f"train(MLP([520, 320, 240, 120]), images, labels, params, {NO_AUGMENTATION!r}, print)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        f"train(MLP([520, 320, 240, 120]), images, labels, params, {NO_AUGMENTATION!r}, print)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def page_faults_per_step(mode: str) -> float:
        result = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, cwd=PROJECT
        )
        return int(result.stdout.split()[-1]) / steps

    assert page_faults_per_step("keep") < page_faults_per_step("glibc default") / 20
