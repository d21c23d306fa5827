"""Where a training step's time goes, in both arithmetics: make bench's `steps` case runs this.

Trains the pipeline's MLP (SGD, as the default params) on random data at the batch size given, with
ATen pinned as in the stages, for the portable and the native arithmetic in turn, and prints a JSON
object: each arithmetic's milliseconds a step, from torch.profiler's self times of the ATen operations
sorted into products, roundings to the grids, conversions, the optimizer and the other operations,
and the rest of the step's wall time under the profiler (Python, autograd, dispatch) as "rest";
plus the step's milliseconds without the profiler (the median of 5 alternating rounds).

    python benchmarks/step_profile.py 64
"""

# The stages' numeric settings come before torch loads (see mnist_pipeline/numerics.py).
from mnist_pipeline.numerics import pin_kernels

pin_kernels()

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.profiler import profile  # noqa: E402

from mnist_pipeline.exact import use_exact_products  # noqa: E402
from mnist_pipeline.model import MLP  # noqa: E402
from mnist_pipeline.optim import Optimizer  # noqa: E402
from mnist_pipeline.params import TrainParams  # noqa: E402
from mnist_pipeline.training import keep_freed_memory  # noqa: E402

CATEGORIES = {
    "products": {"aten::mm", "aten::bmm", "aten::addmm"},
    "roundings": {"aten::aminmax", "aten::add", "aten::sub_", "aten::item", "aten::_local_scalar_dense"},
    "conversions": {"aten::to", "aten::_to_copy", "aten::copy_"},
    "optimizer": {"aten::_fused_sgd_", "aten::_fused_adamw_"},
}
STEPS = 100


def main() -> None:
    batch = int(sys.argv[1])
    keep_freed_memory()
    defaults = yaml.safe_load(Path("params.yaml").read_text())["train"]
    params = TrainParams(**{**defaults, "batch_size": batch})
    torch.manual_seed(1)
    model = MLP([520, 320, 240, 120])
    optimizer = Optimizer(list(model.parameters()), params, 10**6)
    images, labels = torch.rand(batch, 784), torch.randint(0, 10, (batch,))

    def steps(count: int) -> None:
        for _ in range(count):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    arithmetics = {"native": False, "portable": True}
    wall: dict[str, list[float]] = {name: [] for name in arithmetics}
    for round_number in range(5):
        for name in arithmetics if round_number % 2 else reversed(arithmetics):
            use_exact_products(arithmetics[name])
            steps(10)
            start = time.perf_counter()
            steps(STEPS)
            wall[name].append((time.perf_counter() - start) / STEPS * 1e3)
    result = {}
    for name, exact in arithmetics.items():
        use_exact_products(exact)
        with profile() as profiler:
            start = time.perf_counter()
            steps(STEPS)
            profiled = (time.perf_counter() - start) / STEPS * 1e3
        split = dict.fromkeys([*CATEGORIES, "other operations"], 0.0)
        for event in profiler.key_averages():
            if event.key.startswith("aten::"):
                category = next((c for c, names in CATEGORIES.items() if event.key in names), "other operations")
                split[category] += event.self_cpu_time_total / 1e3 / STEPS
        split["rest"] = profiled - sum(split.values())
        result[name] = {"step": statistics.median(wall[name]), "profiled": profiled, **split}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
