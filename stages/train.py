"""Stage train: fit the MLP on the training set; write the checkpoint and the per-epoch history."""

import dataclasses
import time
from pathlib import Path

import torch

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.model import MLP, save_checkpoint
from mnist_pipeline.params import ModelParams, TrainParams, load_params
from mnist_pipeline.stage import run_stage, write_table
from mnist_pipeline.training import check_model_fits, configure_device, cores_needed, select_device, train


def main(params: Path, data: Path, checkpoint: Path, history: Path) -> None:
    model_params = load_params(params, "model", ModelParams)
    train_params = load_params(params, "train", TrainParams)
    device = select_device(train_params.device)
    check_model_fits(model_params.hidden_sizes, train_params, device)
    configure_device(train_params, device)
    start = time.perf_counter()
    images, labels = to_tensors(*load_mnist(data, "train"), device)
    print(f"loaded {len(images)} training images in {time.perf_counter() - start:.2f} s")
    torch.manual_seed(train_params.seed)  # initial weights, made on the CPU so every device starts alike
    model = MLP(model_params.hidden_sizes).to(device)
    with reserved_cores(cores_needed(device)):  # other trainings on this machine wait for them: see cores.py
        print(
            f"training on {device} ({train_params.precision}, {torch.get_num_threads()} threads): "
            f"{len(images)} images, {train_params.epochs} epochs, batch {train_params.batch_size}, "
            f"{train_params.optimizer} lr {train_params.lr} {train_params.schedule}"
        )
        epochs = train(model, images, labels, train_params)
    save_checkpoint(model.cpu(), dataclasses.asdict(train_params), checkpoint)
    write_table(epochs, history)


if __name__ == "__main__":
    run_stage(main)
