"""Stage train: fit the MLP on the training set; write the checkpoint, log each epoch with DVCLive,
and draw a few training digits beside their augmented versions."""

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from mnist_pipeline import distributed
from mnist_pipeline.augment import examples
from mnist_pipeline.cores import cores_needed, reserved_cores
from mnist_pipeline.data import load_mnist, to_tensors
from mnist_pipeline.model import MLP, save_checkpoint
from mnist_pipeline.params import AugmentParams, ModelParams, TrainParams, load_params
from mnist_pipeline.pictures import digits_grid, write_gif
from mnist_pipeline.resume import discard_state, load_state, project_sources, save_state, state_path
from mnist_pipeline.shipped import evaluate_shipped
from mnist_pipeline.stage import counted, interruptions_deferred, is_rank, run_stage
from mnist_pipeline.training import Progress, check_model_fits, configure_device, select_device, train


def main(params: Path, data: Path, checkpoint: Path, live: Path, augmented: Path) -> None:
    model_params = load_params(params, "model", ModelParams)
    train_params = load_params(params, "train", TrainParams)
    augment_params = load_params(params, "augment", AugmentParams)
    device = select_device(train_params.device)
    check_model_fits(model_params.hidden_sizes, train_params, device)
    if distributed.launches_ranks(train_params):
        # This process only launches the ranks: torchrun runs this stage once per rank, with this command line.
        # The data is checked here first, so that damaged files are one error, not one per rank.
        for split in ("train", "test"):
            load_mnist(data, split)
        distributed.launch(train_params, device, __spec__.name, sys.argv[1:], outputs=[checkpoint, live, augmented])
        return
    settings = repr((model_params, train_params, augment_params))
    group = distributed.process_group(train_params, device, settings) if is_rank() else nullcontext(device)
    with group as device:  # a rank's own device: its own GPU on CUDA
        configure_device(train_params, device)
        start = time.perf_counter()
        train_split, test_split = load_mnist(data, "train"), load_mnist(data, "test")
        images, labels = to_tensors(*train_split, device)
        test_images, test_labels = to_tensors(*test_split, device)
        torch.manual_seed(train_params.seed)  # initial weights, made on the CPU so every device starts alike
        model = MLP(model_params.hidden_sizes).to(device)
        rank, world = distributed.rank_and_world()
        # Rank 0 looks for the state that an interrupted run of this very training saved, and hands it on.
        state = state_path(settings, [*train_split, *test_split], project_sources()) if rank == 0 else None
        progress = load_state(state, live) if state else None
        if world > 1:
            shared = [progress]
            torch.distributed.broadcast_object_list(shared, 0)
            progress = shared[0]
        if rank == 0:
            seconds = time.perf_counter() - start
            print(f"loaded {len(images)} training and {len(test_images)} test images in {seconds:.2f} s")
            if progress:
                print(f"resuming after epoch {progress.epoch} of {train_params.epochs}: an interrupted run saved it")
            snapshot = (lambda done: save_state(state, done, live)) if state else None
            log_training(
                model, images, labels, test_images, test_labels, train_params, augment_params, live, progress, snapshot
            )
            trained_with = {**train_params.determining(), "augment": dataclasses.asdict(augment_params)}
            save_checkpoint(model.cpu(), trained_with, checkpoint)
            write_gif(digits_grid(examples(images, labels, augment_params, train_params.seed)), augmented)
            if state:
                discard_state(state)  # the training has ended: nothing is left to resume
        else:  # the other ranks train alongside rank 0, which alone logs and writes
            train(model, images, labels, train_params, augment_params, report=None, resume=progress)


# The whole of DVCLive's run, its start and end too, where a KeyboardInterrupt raised between two bytecodes
# could break its threads (see interruptions_deferred): a signal stops the training at its next step, or
# this function at its end, with DVCLive's files whole.
@interruptions_deferred()
def log_training(
    model: MLP,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    params: TrainParams,
    augment: AugmentParams,
    live: Path,
    resume: Progress | None,
    snapshot: Callable[[Progress], None] | None,
) -> None:
    """Train, logging each epoch with DVCLive in `live`, which is removed if training does not finish; from
    `resume` on, if given (its DVCLive files are in `live`), and passing `snapshot` each epoch's progress."""
    device = images.device
    # DVCLive writes live/metrics.json and a TSV per metric under live/plots/metrics after every
    # epoch, which is what `dvc exp show`, the VS Code extension and Studio follow while it trains.
    # dvc.yaml declares these outputs, and DVC makes the experiments: DVCLive does neither.
    # Other trainings on this machine wait for the reserved cores meanwhile (see cores.py); a rank's
    # were reserved by the launch, for all ranks at once.
    cores = nullcontext() if is_rank() else reserved_cores(cores_needed(device.type, torch.get_num_threads()))
    try:
        with Live(str(live), save_dvc_exp=False, dvcyaml=None, resume=resume is not None) as logger, cores:
            processes = f" x {distributed.rank_and_world()[1]} processes" if is_rank() else ""
            threads = counted(torch.get_num_threads(), "thread")
            print(
                f"training on {device}{processes} ({params.precision} {params.arithmetic}, {threads}): "
                f"{len(images)} images, {counted(params.epochs, 'epoch')}, batch {params.batch_size}, "
                f"{params.optimizer} lr {params.lr} {params.schedule}"
            )
            train(
                model,
                images,
                labels,
                params,
                augment,
                report=lambda row: log_epoch(logger, row, model, test_images, test_labels),
                resume=resume,
                snapshot=snapshot,
            )
    except BaseException:
        shutil.rmtree(live, ignore_errors=True)  # the log of a run that did not finish is not a result
        raise


def log_epoch(logger: Live, row: dict, model: MLP, test_images: torch.Tensor, test_labels: torch.Tensor) -> None:
    """Log an epoch's training row (see train), and the loss and accuracy on the test set of the model as
    it would ship (as the evaluate stage measures it), as one step."""
    test = evaluate_shipped(model, test_images, test_labels)
    tqdm.write(f"epoch {row['epoch']}: test loss {test.loss:.4f}, accuracy {test.accuracy:.4f}")  # under the bar
    for name, value in {**row, "test/loss": test.loss, "test/accuracy": test.accuracy}.items():
        if name != "epoch":
            logger.log_metric(name, value)
    logger.next_step()


if __name__ == "__main__":
    run_stage(main)
