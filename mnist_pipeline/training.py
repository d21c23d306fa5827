"""Training the MLP with the whole dataset held as tensors on the device."""

import os
import time

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mnist_pipeline.model import MLP
from mnist_pipeline.params import TrainParams
from mnist_pipeline.stage import PipelineError

PROGRESS_EVERY = 100  # batches between loss readouts: each one waits for the device


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
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.device(name)


def train(model: MLP, images: torch.Tensor, labels: torch.Tensor, params: TrainParams) -> pd.DataFrame:
    """SGD with momentum on cross-entropy; returns the per-epoch mean loss and accuracy on the batches seen."""
    torch.use_deterministic_algorithms(True)
    # foreach: one fused update over all parameters instead of a loop of small ops.
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum, foreach=True)
    shuffle = torch.Generator().manual_seed(params.seed)
    n = len(images)
    history = []
    model.train()
    with tqdm(total=params.epochs * n, unit="img", unit_scale=True, desc="train") as progress:
        for epoch in range(1, params.epochs + 1):
            start = time.perf_counter()
            # Shuffled on the CPU so that every device sees the same order; one gather per
            # epoch, then each batch is a contiguous slice.
            order = torch.randperm(n, generator=shuffle).to(images.device)
            epoch_images, epoch_labels = images[order], labels[order]
            loss_sum = torch.zeros((), device=images.device)
            correct = torch.zeros((), dtype=torch.int64, device=images.device)
            for step, first in enumerate(range(0, n, params.batch_size), start=1):
                x = epoch_images[first : first + params.batch_size]
                y = epoch_labels[first : first + params.batch_size]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                progress.update(len(y))
                if step % PROGRESS_EVERY == 0:
                    progress.set_postfix(epoch=f"{epoch}/{params.epochs}", loss=f"{loss.item():.4f}")
            del epoch_images, epoch_labels  # freed before the next epoch's copy is made
            history.append({"epoch": epoch, "loss": loss_sum.item() / n, "accuracy": correct.item() / n})
            progress.write(
                f"epoch {epoch}/{params.epochs}: loss {history[-1]['loss']:.4f}, "
                f"accuracy {history[-1]['accuracy']:.4f}, {time.perf_counter() - start:.1f} s"
            )
    model.eval()
    return pd.DataFrame(history)
