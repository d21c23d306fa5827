"""Stage train: fit the MLP on the training set -> models/checkpoint.pt, metrics/train_history.csv."""

import dataclasses
import time
from pathlib import Path

import torch

from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.model import MLP, save_checkpoint
from mnist_pipeline.params import ModelParams, TrainParams, load_params
from mnist_pipeline.stage import run_stage, write_table
from mnist_pipeline.training import configure_device, select_device, train

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
DATA_DIR = ROOT / "data" / "mnist"
CHECKPOINT = ROOT / "models" / "checkpoint.pt"
HISTORY = ROOT / "metrics" / "train_history.csv"


def main() -> None:
    model_params = load_params(PARAMS, "model", ModelParams)
    params = load_params(PARAMS, "train", TrainParams)
    device = select_device(params.device)
    configure_device(params, device)
    start = time.perf_counter()
    images, labels = to_tensors(*load_mnist(DATA_DIR, "train"), device)
    print(f"loaded {len(images)} training images in {time.perf_counter() - start:.2f} s")
    torch.manual_seed(params.seed)  # initial weights, made on the CPU so every device starts alike
    model = MLP(model_params.hidden_sizes).to(device)
    print(
        f"training on {device} ({params.precision}, {torch.get_num_threads()} threads): {len(images)} images, "
        f"{params.epochs} epochs, batch {params.batch_size}, {params.optimizer} lr {params.lr} {params.schedule}"
    )
    history = train(model, images, labels, params)
    save_checkpoint(model.cpu(), dataclasses.asdict(params), CHECKPOINT)
    write_table(history, HISTORY)


if __name__ == "__main__":
    run_stage(main)
