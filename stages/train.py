"""Stage train: fit the MLP on the training set; write the checkpoint, and log each epoch with DVCLive."""

import dataclasses
import shutil
import time
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from mnist_pipeline.cores import reserved_cores
from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.metrics import evaluate
from mnist_pipeline.model import MLP, save_checkpoint
from mnist_pipeline.params import ModelParams, TrainParams, load_params
from mnist_pipeline.stage import run_stage
from mnist_pipeline.training import check_model_fits, configure_device, cores_needed, select_device, train


def main(params: Path, data: Path, checkpoint: Path, live: Path) -> None:
    model_params = load_params(params, "model", ModelParams)
    train_params = load_params(params, "train", TrainParams)
    device = select_device(train_params.device)
    check_model_fits(model_params.hidden_sizes, train_params, device)
    configure_device(train_params, device)
    start = time.perf_counter()
    images, labels = to_tensors(*load_mnist(data, "train"), device)
    test_images, test_labels = to_tensors(*load_mnist(data, "test"), device)
    print(f"loaded {len(images)} training and {len(test_images)} test images in {time.perf_counter() - start:.2f} s")
    torch.manual_seed(train_params.seed)  # initial weights, made on the CPU so every device starts alike
    model = MLP(model_params.hidden_sizes).to(device)

    # DVCLive writes live/metrics.json and a TSV per metric under live/plots/metrics after every
    # epoch, which is what `dvc exp show`, the VS Code extension and Studio follow while it trains.
    # dvc.yaml declares these outputs, and DVC makes the experiments: DVCLive does neither.
    try:
        with Live(str(live), save_dvc_exp=False, dvcyaml=None) as logger, reserved_cores(cores_needed(device)):
            print(
                f"training on {device} ({train_params.precision}, {torch.get_num_threads()} threads): "
                f"{len(images)} images, {train_params.epochs} epochs, batch {train_params.batch_size}, "
                f"{train_params.optimizer} lr {train_params.lr} {train_params.schedule}"
            )
            # Other trainings on this machine wait for the reserved cores meanwhile: see cores.py.
            train(
                model, images, labels, train_params, lambda row: log_epoch(logger, row, model, test_images, test_labels)
            )
    except BaseException:
        shutil.rmtree(live, ignore_errors=True)  # the log of a run that did not finish is not a result
        raise
    save_checkpoint(model.cpu(), dataclasses.asdict(train_params), checkpoint)


def log_epoch(logger: Live, row: dict, model: MLP, test_images: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Log an epoch's training row (see train), and the model's loss and accuracy on the test set, as one step."""
    test = evaluate(model, test_images, test_labels)
    tqdm.write(f"epoch {row['epoch']}: test loss {test.loss:.4f}, accuracy {test.accuracy:.4f}")  # under the bar
    for name, value in {**row, "test/loss": test.loss, "test/accuracy": test.accuracy}.items():
        if name != "epoch":
            logger.log_metric(name, value)
    logger.next_step()


if __name__ == "__main__":
    run_stage(main)
