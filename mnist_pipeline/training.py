"""Training the MLP with the whole dataset held as tensors on the device."""

import ctypes
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed
import torch.nn.functional as F
from tqdm import tqdm

from mnist_pipeline.augment import Augmentation
from mnist_pipeline.cores import FreeCores
from mnist_pipeline.data import scale_pixels
from mnist_pipeline.distributed import rank_and_world
from mnist_pipeline.exact import check_portable_kernels, grids_of_the_whole_batch, use_exact_products
from mnist_pipeline.metrics import evaluate
from mnist_pipeline.model import MLP
from mnist_pipeline.optim import Optimizer
from mnist_pipeline.params import AugmentParams, TrainParams
from mnist_pipeline.stage import (
    FailureReported,
    PipelineError,
    counted,
    interruption_point,
    interruptions_deferred,
    is_rank,
)

PROGRESS_EVERY = 100  # batches between loss readouts: each one waits for the device
# A training has diverged when its loss, averaged over the steps between two readouts, runs above this
# many times the untrained model's (about ln 10 = 2.30: a guess). In the portable arithmetic every
# operand is rescaled onto its grid, so a runaway loss stays finite: at train.lr 1000, 908 after 9 epochs.
RUNAWAY_FACTOR = 3
THREADS_EVERY = 10  # batches between looks at the free cores (each a read of /proc/stat, once 0.25 s have passed)
# Training images the untrained model is scored on for epoch 0: as many as the test set has. An
# untrained model's loss varies little between samples, and all 60,000 cost 0.9 s a run.
INITIAL_SAMPLE = 10_000
# glibc mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def select_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind, present in available.items() if present)
    kind = name.split(":")[0]
    if not available[kind]:
        raise PipelineError(f"params.yaml: train.device is '{name}' but this machine has no {kind} device")
    if kind == "cuda":
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise PipelineError(
                f"params.yaml: train.device is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(name)


def configure_device(params: TrainParams, device: torch.device) -> None:
    """Set the process up for training on `device`: threads, memory reuse, determinism, arithmetic, bf16 support."""
    if params.arithmetic == "portable":
        if params.precision == "bf16":
            raise PipelineError(
                "params.yaml: train.precision bf16 runs this machine's own bf16 kernels, whose bytes are its own: "
                "it needs train.arithmetic: native"
            )
        if device.type == "mps":
            raise PipelineError(
                "params.yaml: train.arithmetic portable needs float64, for augmentation, which mps devices lack; "
                "set train.arithmetic: native, or train.device: cpu"
            )
        check_portable_kernels()
    # Set even when it is the default: torch.set_num_threads also turns off MKL's dynamic thread
    # count, which otherwise tears down and recreates OpenMP threads between MKL and other ops.
    # A rank's share of train.num_threads comes from its launch, in OMP_NUM_THREADS (see distributed.launch).
    torch.set_num_threads(torch.get_num_threads() if is_rank() else params.num_threads or torch.get_num_threads())
    if device.type == "cpu":
        keep_freed_memory()
        if params.precision == "bf16" and not cpu_has_native_bf16():
            raise PipelineError(
                "params.yaml: train.precision is bf16 but this CPU has no native bf16 support; use fp32"
            )
    elif device.type == "cuda":
        # Determinism is switched on only here, where kernels differ in it: the CPU kernels this
        # model uses are deterministic already, and the switch imports torch._inductor (150 MB,
        # 1.3 s). cuBLAS also needs a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16 on x86, the BF16 extensions on Arm)."""
    return any(name.endswith("bf16") and present is True for name, present in torch.cpu.get_capabilities().items())


def check_model_fits(hidden_sizes: list[int], params: TrainParams, device: torch.device) -> None:
    """Refuse, before allocating anything, a model whose training cannot fit in `device`'s memory."""
    with torch.device("meta"):  # the model's shapes, without its memory
        weights = sum(parameter.numel() for parameter in MLP(hidden_sizes).parameters())
    # float32 weights and gradients, the optimizer's state, and bf16 or (portable) rounded copies of the weights.
    state = {"sgd": 1 if params.momentum else 0, "adamw": 2}[params.optimizer]
    copy = 2 if params.precision == "bf16" else 4 if params.arithmetic == "portable" else 0
    needed = weights * (4 * (2 + state) + copy)
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf"):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if needed > available:
        raise PipelineError(
            f"params.yaml: model.hidden_sizes {hidden_sizes} makes {weights:,} weights, which need at least "
            f"{needed / 2**30:,.1f} GiB to train; this {device.type} device has {available / 2**30:,.1f} GiB"
        )


def keep_freed_memory() -> None:
    """Keep the memory of each step's tensors in the process for the next step (glibc only).

    glibc unmaps freed blocks over 128 KB and trims the heap, so each step's activations and
    bf16 weight copies page-fault in afresh: about 750 faults a step at batch 384, a third of
    a bf16 step on 2 cores. (PyTorch's CPU tuning guide suggests jemalloc for the same reason.)
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)  # the largest that glibc accepts on 64-bit
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def stop_if_diverged(
    losses: torch.Tensor,
    epoch: int,
    steps_before: int,
    optimizer: Optimizer,
    untrained_loss: float,
    reported_by_other: bool = False,
) -> None:
    """Raise a PipelineError if `losses`, the optimizer's latest steps (this epoch's after the first
    `steps_before`), hold a NaN or an infinity, or average more than RUNAWAY_FACTOR times
    `untrained_loss`, naming the first step that did; FailureReported instead if `reported_by_other`
    (a rank other than 0, which says it)."""
    values = losses.tolist()  # on the host, where their mean is Python's float arithmetic on any CPU
    limit = RUNAWAY_FACTOR * untrained_loss
    finite = all(map(math.isfinite, values))
    runaway = finite and math.fsum(values) / len(values) > limit
    diverged = [i for i, value in enumerate(values) if not math.isfinite(value) or (runaway and value > limit)]
    if diverged and reported_by_other:
        raise FailureReported()
    if diverged:
        index = diverged[0]
        lr = optimizer.lr_at(optimizer.steps_taken - len(values) + index)
        loss = f"{values[index]:g}"
        if runaway:
            loss += f", more than {RUNAWAY_FACTOR} times the untrained model's {untrained_loss:.4f}"
        raise PipelineError(
            f"params.yaml: training diverged at epoch {epoch}, step {steps_before + index + 1}: the loss is "
            f"{loss} (learning rate {lr:g}); lower train.lr"
        )


@dataclass
class Progress:
    """A training at the end of an epoch: everything its next steps read, so that one resumed from here
    goes on exactly as it would have."""

    epoch: int  # epochs completed
    model: dict  # the weights, a state_dict
    optimizer: dict  # Optimizer.state_dict()
    shuffle: torch.Tensor  # the shuffling generator's state
    augmentation: torch.Tensor  # the deformations' generator's state


@interruptions_deferred()  # a stage's SIGINT or SIGTERM stops it between two steps (see stage.py)
def train(
    model: MLP,
    images: torch.Tensor,
    labels: torch.Tensor,
    params: TrainParams,
    augment: AugmentParams,
    report: Callable[[dict], None] | None,
    resume: Progress | None = None,
    snapshot: Callable[[Progress], None] | None = None,
) -> None:
    """Minimize cross-entropy on uint8 `images` [N, 784], deformed as `augment` says, passing
    `report` a row per epoch, then `snapshot` the progress made (if given: its tensors are the
    training's own, to be saved before it returns). With `resume`, go on from there (the epochs it
    completed were reported before).

    A row holds the epoch, the mean loss and the accuracy on the batches it trained on
    ("train/loss", "train/accuracy") and the learning rate of its last step ("lr"). It starts with
    epoch 0: the untrained model on the first INITIAL_SAMPLE images, and the first step's learning
    rate, so that a one-epoch run draws a line too.

    In a distributed training (see distributed.py) every rank calls this with the whole dataset
    and the same seed, so all draw the same shuffled order; each takes every world-th image of
    each batch, rounds it to the whole batch's grids, and the ranks average their gradients
    (average_gradients): with a power-of-two process count and a batch of at most 256 images, split
    evenly or not, the same bits as one process (docs/scaling.md). Rank 0 alone reports (the
    others pass None) and shows progress.
    """
    rank, world = rank_and_world()
    lead = report is not None  # rank 0, or the only process
    device = images.device
    n = len(images)
    steps_per_epoch = math.ceil(n / params.batch_size)
    optimizer = Optimizer(list(model.parameters()), params, params.epochs * steps_per_epoch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=params.precision == "bf16")
    # For the whole process from here: every step, and every test pass that `report` makes.
    use_exact_products(params.arithmetic == "portable")
    shuffle = torch.Generator().manual_seed(params.seed)
    augmentation = Augmentation(augment, params.seed, device)
    # Threads fitted to the cores other programs leave free, where the count changes no bit: in the
    # portable arithmetic, with train.num_threads 0 (all cores), in one process on the CPU.
    adapt = params.arithmetic == "portable" and params.num_threads == 0 and world == 1 and device.type == "cpu"
    free_cores = FreeCores() if adapt else None
    most_threads = torch.get_num_threads()
    model.train()
    started = time.perf_counter()
    if free_cores:
        fit_threads(free_cores, most_threads, None)
    # The untrained model's loss, the measure of a runaway one (also on resuming, from the same initial
    # weights): rank 0 reports it, and every rank goes by rank 0's.
    initial = evaluate(model, images[:INITIAL_SAMPLE], labels[:INITIAL_SAMPLE])
    untrained = torch.tensor(initial.loss, dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.broadcast(untrained, 0)
    untrained_loss = untrained.item()
    if resume:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        shuffle.set_state(resume.shuffle)
        augmentation.generator.set_state(resume.augmentation)
    elif lead:
        report({"epoch": 0, "train/loss": initial.loss, "train/accuracy": initial.accuracy, "lr": optimizer.lr()})
    first_epoch = resume.epoch + 1 if resume else 1
    reporting = time.perf_counter() - started
    saving = 0.0
    # A terminal redraws the bar in place; a log (dvc queue logs, CI) keeps every redraw: there, one every 30 s.
    redraw = 0.1 if sys.stderr.isatty() else 30.0
    with tqdm(
        total=params.epochs * n,
        initial=(first_epoch - 1) * n,
        unit="img",
        unit_scale=True,
        desc="train",
        disable=not lead,
        mininterval=redraw,
    ) as progress:
        for epoch in range(first_epoch, params.epochs + 1):
            start = time.perf_counter()
            # Shuffled on the CPU so that every device sees the same order.
            order = torch.randperm(n, generator=shuffle).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            # Each step's loss stays on the device until the next readout, which stops a diverged
            # training at the step where it went wrong, with no host synchronisation per step. A rank
            # keeps its logits instead: its loss is its share's, and the batch's comes at the readout.
            pending = []  # (the step's loss, or a rank's logits, and the batch) since the last readout
            checked = 0
            for step, first in enumerate(range(0, n, params.batch_size), start=1):
                interruption_point()
                batch = order[first : first + params.batch_size]
                mine = batch if world == 1 else batch[rank::world]
                # index_select copies whole rows; images[batch] goes element by element, 7-26x slower.
                x, y = scale_pixels(images.index_select(0, mine)), labels.index_select(0, mine)
                x = augmentation(x, len(batch), share=slice(rank, None, world))
                with grids_of_the_whole_batch(world > 1):
                    with autocast:
                        logits = model(x)
                        loss = batch_loss(logits, y, len(batch), world, params.label_smoothing)
                    optimizer.zero_grad()
                    loss.backward()
                if world > 1:
                    average_gradients(model, world)
                optimizer.step()
                pending.append((loss.detach() if world == 1 else logits.detach(), batch))
                correct += (logits.argmax(1) == y).sum()
                progress.update(len(batch))
                if step % PROGRESS_EVERY == 0 or step == steps_per_epoch:
                    # The same losses on every rank: all stop at the same step, and rank 0 says why.
                    losses = (
                        [kept for kept, _ in pending] if world == 1 else whole_batch_losses(pending, labels, params)
                    )
                    for loss_of_batch, (_, taken) in zip(losses, pending, strict=True):
                        loss_sum += loss_of_batch * len(taken)
                    stop_if_diverged(torch.stack(losses), epoch, checked, optimizer, untrained_loss, not lead)
                    pending.clear()
                    checked = step
                if lead and step % PROGRESS_EVERY == 0:
                    progress.set_postfix(
                        epoch=f"{epoch}/{params.epochs}", loss=f"{losses[-1].item():.4f}", refresh=False
                    )
                if free_cores and step % THREADS_EVERY == 0:
                    fit_threads(free_cores, most_threads, progress)
            if world > 1:
                torch.distributed.all_reduce(correct)
            if not lead:
                continue
            row = {
                "epoch": epoch,
                "train/loss": loss_sum.item() / n,
                "train/accuracy": correct.item() / n,
                "lr": optimizer.lr_at(optimizer.steps_taken - 1),
            }
            trained = time.perf_counter()
            progress.write(
                f"epoch {epoch}/{params.epochs}: loss {row['train/loss']:.4f}, "
                f"accuracy {row['train/accuracy']:.4f}, {trained - start:.1f} s"
            )
            report(row)
            reported = time.perf_counter()
            reporting += reported - trained
            if snapshot:
                shuffled, deformed = shuffle.get_state(), augmentation.generator.get_state()
                snapshot(Progress(epoch, model.state_dict(), optimizer.state_dict(), shuffled, deformed))
                saving += time.perf_counter() - reported
    seconds = time.perf_counter() - started - reporting - saving
    if free_cores:  # the caller's count again, for what it runs next
        torch.set_num_threads(most_threads)
    if lead:
        processes = f" on {world} processes" if world > 1 else ""
        epochs = params.epochs - first_epoch + 1
        print(
            f"trained {counted(epochs, 'epoch')}{processes} in {seconds:.2f} s "
            f"({epochs * n / seconds:,.0f} img/s), plus {reporting:.2f} s of per-epoch evaluation"
            + (f" and {saving:.2f} s saving its state (to resume from)" if snapshot else "")
        )
    model.eval()


def fit_threads(free_cores: FreeCores, most: int, progress: tqdm | None) -> None:
    """Run as many threads as there are free cores (at least 1, at most `most`), saying so when that changes
    (to `progress`, or else to stdout)."""
    free = free_cores.count()
    if free is None:
        return
    threads = max(1, min(most, math.floor(free + 0.5)))  # a core counts if half of it is free
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        busy, cores = free_cores.cores - free, counted(free_cores.cores, "core")
        (progress or tqdm).write(
            f"{counted(threads, 'thread')} from here: other processes keep {busy:.1f} of {cores} busy"
        )


def whole_batch_losses(
    shares: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor, params: TrainParams
) -> list[torch.Tensor]:
    """Each batch's mean loss as one process computes it, from the whole batch's logits: this rank's
    `shares` (its logits of each batch, with the batch) and every other rank's, gathered. The same
    on every rank, and the same bits as in one process."""
    world = torch.distributed.get_world_size()
    # Each share padded to the rows of the batch's largest, since all_gather takes tensors of one shape.
    largest = [-(-len(batch) // world) for _, batch in shares]
    mine = torch.cat(
        [F.pad(logits.float(), (0, 0, 0, largest[i] - len(logits))) for i, (logits, _) in enumerate(shares)]
    )
    gathered = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    losses, first = [], 0
    for i, (logits, batch) in enumerate(shares):
        whole = mine.new_empty(len(batch), logits.shape[1])
        for rank, theirs in enumerate(gathered):
            whole[rank::world] = theirs[first : first + len(range(rank, len(batch), world))]
        first += largest[i]
        losses.append(F.cross_entropy(whole, labels.index_select(0, batch), label_smoothing=params.label_smoothing))
    return losses


def average_gradients(model: MLP, world: int) -> None:
    """Replace each rank's gradients by their mean over the `world` ranks, as DistributedDataParallel would:
    each divided by the rank count, then summed, in one all-reduce of them all. (Not DDP itself: its
    constructor imports torch._dynamo, 1.1 s of CPU in every rank, for a model this small.)"""
    gradients = [parameter.grad for parameter in model.parameters()]
    flat = torch.cat([gradient.flatten() for gradient in gradients]).div_(world)
    torch.distributed.all_reduce(flat)
    for gradient, mean in zip(gradients, flat.split([gradient.numel() for gradient in gradients]), strict=True):
        gradient.copy_(mean.view_as(gradient))


def batch_loss(
    logits: torch.Tensor, labels: torch.Tensor, batch_size: int, world: int, label_smoothing: float
) -> torch.Tensor:
    """This process's share of the batch's mean cross-entropy, such that the mean over the `world`
    processes (average_gradients) is the batch's mean: with the batch split evenly, as
    always in one process, the mean over the process's own images."""
    if len(labels) * world == batch_size:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    # The last batch, split unevenly: each image counts as one of the whole batch, and a rank may have none.
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing) * (world / batch_size)
