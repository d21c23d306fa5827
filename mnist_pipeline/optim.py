"""SGD with momentum and AdamW, each a single fused kernel call per step, and the one-cycle schedule.

These are torch.optim's fused kernels through its public functional API, without the
torch.optim.Optimizer classes: their first step imports torch._dynamo, which costs about
150 MB of memory and 1.3 s of start-up on a 2-core machine. tests/test_optim.py checks every
step against torch.optim and that torch._dynamo stays unimported.
"""

import math

import torch
import torch.optim.functional

from mnist_pipeline.params import TrainParams

ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
# torch.optim.lr_scheduler.OneCycleLR's defaults: warm up over the first 30% of the steps from
# lr/25, then anneal to lr/25/1e4, both along a half cosine.
WARMUP_FRACTION = 0.3
START_DIVISOR = 25.0
END_DIVISOR = START_DIVISOR * 1e4


def one_cycle_lr(step: int, total_steps: int, peak: float) -> float:
    """The learning rate of 0-based `step` out of `total_steps` under the one-cycle schedule."""
    warmup_end = WARMUP_FRACTION * total_steps - 1
    if step <= warmup_end:
        start, end, progress = peak / START_DIVISOR, peak, step / warmup_end
    else:
        start, end, progress = peak, peak / END_DIVISOR, (step - warmup_end) / (total_steps - 1 - warmup_end)
    return end + (start - end) / 2 * (math.cos(math.pi * progress) + 1)


class Optimizer:
    """train.optimizer with train.lr under train.schedule, over `total_steps` steps."""

    def __init__(self, parameters: list[torch.Tensor], params: TrainParams, total_steps: int) -> None:
        self.parameters = parameters
        self.params = params
        self.total_steps = total_steps
        self.steps_taken = 0
        if params.optimizer == "sgd":
            # Filled in by the first step, as torch.optim.SGD does.
            self.momentum_buffers: list[torch.Tensor | None] = [None] * len(parameters)
        else:
            self.exp_avgs = [torch.zeros_like(p) for p in parameters]
            self.exp_avg_sqs = [torch.zeros_like(p) for p in parameters]
            self.adam_steps = [torch.zeros((), device=p.device) for p in parameters]

    def state_dict(self) -> dict:
        """What the next steps read besides the weights: the step count and the per-parameter buffers."""
        if self.params.optimizer == "sgd":
            return {"steps_taken": self.steps_taken, "momentum_buffers": self.momentum_buffers}
        buffers = {"exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs, "adam_steps": self.adam_steps}
        return {"steps_taken": self.steps_taken, **buffers}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of an optimizer of the same params and parameters."""
        device = self.parameters[0].device
        for name, value in state.items():
            buffers = [None if t is None else t.to(device) for t in value] if isinstance(value, list) else value
            setattr(self, name, buffers)

    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.lr_at(self.steps_taken)

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based `step`."""
        if self.params.schedule == "onecycle":
            return one_cycle_lr(step, self.total_steps, self.params.lr)
        return self.params.lr

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.parameters]
        if self.params.optimizer == "sgd":
            torch.optim.functional.sgd(
                self.parameters,
                grads,
                self.momentum_buffers,
                fused=True,
                weight_decay=self.params.weight_decay,
                momentum=self.params.momentum,
                lr=self.lr(),
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
        else:
            torch.optim.functional.adamw(
                self.parameters,
                grads,
                self.exp_avgs,
                self.exp_avg_sqs,
                [],
                self.adam_steps,
                fused=True,
                lr=self.lr(),
                beta1=ADAMW_BETAS[0],
                beta2=ADAMW_BETAS[1],
                weight_decay=self.params.weight_decay,
                eps=ADAMW_EPS,
                amsgrad=False,
                maximize=False,
            )
        self.steps_taken += 1
