import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import NO_AUGMENTATION, PROJECT, TRAIN_PARAMS

from mnist_pipeline.optim import Optimizer
from mnist_pipeline.params import TrainParams

STEPS = 20


def reference(params: TrainParams, parameters: list[torch.Tensor]) -> tuple[torch.optim.Optimizer, object]:
    """torch.optim's optimizer and scheduler for the same settings."""
    if params.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            parameters, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = None
    if params.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=STEPS, cycle_momentum=False
        )
    return optimizer, scheduler


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"momentum": 0.0},
        {"weight_decay": 0.01, "schedule": "onecycle"},
        {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01},
        {"optimizer": "adamw", "lr": 0.01, "schedule": "onecycle"},
    ],
)
def test_each_step_matches_torch_optim(changes):
    params = dataclasses.replace(TRAIN_PARAMS, **changes)
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=generator), torch.randn(3, generator=generator)]
    theirs = [p.clone().requires_grad_() for p in ours]
    initial = ours[0].clone()
    optimizer = Optimizer(ours, params, STEPS)
    reference_optimizer, scheduler = reference(params, theirs)
    for _ in range(STEPS):
        assert optimizer.lr() == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)
        for mine, other in zip(ours, theirs, strict=True):
            mine.grad = torch.randn(mine.shape, generator=generator)
            other.grad = mine.grad.clone()
        optimizer.step()
        reference_optimizer.step()
        if scheduler is not None:
            scheduler.step()
    for mine, other in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, other.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], initial)


def test_training_leaves_torch_dynamo_unimported():
    # torch.optim's step and torch.use_deterministic_algorithms import torch._dynamo or
    # torch._inductor: 150 MB and 1.3 s that a CPU run must not pay. Set up as the train stage does.
    code = (
        "import dataclasses, sys, torch\n"
        "from mnist_pipeline.model import MLP\n"
        "from mnist_pipeline.params import AugmentParams, TrainParams\n"
        "from mnist_pipeline.training import configure_device, select_device, train\n"
        f"TRAIN_PARAMS = {TRAIN_PARAMS!r}\n"
        "configure_device(TRAIN_PARAMS, select_device('cpu'))\n"
        "torch.manual_seed(0)\n"  # random labels, fixed: at a low learning rate their loss never runs away
        "images, labels = torch.randint(0, 256, (64, 784), dtype=torch.uint8), torch.randint(0, 10, (64,))\n"
        "for kind in ('sgd', 'adamw'):\n"
        "    params = dataclasses.replace(TRAIN_PARAMS, optimizer=kind, schedule='onecycle', lr=0.01)\n"
        f"    train(MLP([16]), images, labels, params, {NO_AUGMENTATION!r}, lambda row: None)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT)
    assert result.stdout.splitlines()[-1] == "[]"
