"""SGD with momentum and AdamW, each a single fused kernel call per step, and the one-cycle schedule.

These are the kernels torch.optim runs with fused=True, called without torch.optim's wrappers:
their first step imports torch._dynamo, which costs about 150 MB of memory and 1.3 s of
start-up on a 2-core machine. tests/test_optim.py checks every step against torch.optim.
"""

import math

import torch

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
            # The fused kernel takes no buffers when there is no momentum.
            self.momentum_buffers = [torch.zeros_like(p) for p in parameters] if params.momentum else []
        else:
            self.exp_avgs = [torch.zeros_like(p) for p in parameters]
            self.exp_avg_sqs = [torch.zeros_like(p) for p in parameters]
            self.adam_steps = [torch.zeros((), device=p.device) for p in parameters]

    def lr(self) -> float:
        """The learning rate of the next step."""
        if self.params.schedule == "onecycle":
            return one_cycle_lr(self.steps_taken, self.total_steps, self.params.lr)
        return self.params.lr

    def zero_grad(self) -> None:
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.parameters]
        if self.params.optimizer == "sgd":
            torch._fused_sgd_(
                self.parameters,
                grads,
                self.momentum_buffers,
                weight_decay=self.params.weight_decay,
                momentum=self.params.momentum,
                lr=self.lr(),
                dampening=0.0,
                nesterov=False,
                maximize=False,
                is_first_step=self.steps_taken == 0,
            )
        else:
            torch._foreach_add_(self.adam_steps, 1.0)
            torch._fused_adamw_(
                self.parameters,
                grads,
                self.exp_avgs,
                self.exp_avg_sqs,
                [],
                self.adam_steps,
                lr=self.lr(),
                beta1=ADAMW_BETAS[0],
                beta2=ADAMW_BETAS[1],
                weight_decay=self.params.weight_decay,
                eps=ADAMW_EPS,
                amsgrad=False,
                maximize=False,
            )
        self.steps_taken += 1
