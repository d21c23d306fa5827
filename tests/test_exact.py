"""The portable arithmetic: exact matrix products (mnist_pipeline/exact.py) and the kernels every stage pins."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PROJECT, user_environment

from mnist_pipeline.exact import (
    GRID_BITS,
    ExactLinear,
    exact_matmul,
    grid_product,
    library_product,
    on_grid,
    use_exact_products,
)
from mnist_pipeline.model import MLP
from mnist_pipeline.numerics import KERNELS, X86_64
from mnist_pipeline.torchscript import load_torchscript


def linear_with_grads(function, x, weight, bias, grad_y):
    """y = function(x, weight, bias) and the gradients of <y, grad_y> with respect to x, weight and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = function(*leaves)
    y.backward(grad_y)
    return y.detach(), *(leaf.grad for leaf in leaves)


def test_products_of_small_integers_are_the_exact_integers():
    generator = torch.Generator().manual_seed(0)
    x, weight, grad_y = (
        torch.randint(-50, 50, shape, generator=generator).float() for shape in [(7, 9), (5, 9), (7, 5)]
    )
    bias = torch.arange(5.0)
    exact = linear_with_grads(ExactLinear.apply, x, weight, bias, grad_y)
    reference = linear_with_grads(F.linear, *(t.double() for t in (x, weight, bias, grad_y)))
    for got, expected in zip(exact, reference, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got.double(), expected)


def test_products_keep_the_accuracy_of_their_grids():
    """Each operand keeps 8 significant bits below the largest magnitude of its row (inputs) or of the
    whole (weights, gradients), and the sums are exact: every result is within a few units of those
    grids of the float64 product, and the matrices as wholes within 2**-6 of it (Gaussian operands,
    whose largest magnitudes lie about 4 standard deviations out, keep about 6 bits for most entries)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 784, generator=generator).relu_()
    weight = torch.randn(520, 784, generator=generator) / 28
    bias = torch.randn(520, generator=generator) / 10
    grad_y = torch.randn(64, 520, generator=generator) * 1e-3
    exact = linear_with_grads(ExactLinear.apply, x, weight, bias, grad_y)
    reference = linear_with_grads(F.linear, *(t.double() for t in (x, weight, bias, grad_y)))
    x, weight, grad_y = x.double(), weight.double(), grad_y.double()
    ones = torch.ones(1, 64, dtype=torch.float64)
    products = [(x, weight.T), (grad_y, weight), (grad_y.T, x), (ones, grad_y)]  # y, grad_x, grad_weight, grad_bias
    for got, expected, (a, b) in zip(exact, reference, products, strict=True):
        error = got.double() - expected
        assert error.abs().max() <= 2.0 ** (1 - GRID_BITS) * a.shape[1] * a.abs().max() * b.abs().max()
        assert error.norm() <= 2**-6 * expected.norm()


def test_long_sums_are_exact_in_chunks_and_added_in_order():
    """Products of integers on the grids, with sums of 784, 520 and 769 terms (a prime: unequal chunks),
    in batches too: each chunk of 256 terms or fewer exact, so a total that float32 holds is exact."""
    generator = torch.Generator().manual_seed(6)
    for terms in (784, 520, 769):
        a = torch.randint(-16, 17, (5, terms), generator=generator).float()
        b = torch.randint(-16, 17, (terms, 7), generator=generator).float()
        assert torch.equal(grid_product(a, b), (a.long() @ b.long()).float())
        batch_a, batch_b = a.expand(3, -1, -1), b.expand(3, -1, -1)
        assert torch.equal(grid_product(batch_a, batch_b), (batch_a.long() @ batch_b.long()).float())


def test_an_all_zero_row_gives_the_bias_and_a_non_finite_value_gives_nan():
    weight, bias = torch.randn(3, 4), torch.randn(3)
    x = torch.zeros(3, 4)
    x[1, 2] = 1.0
    y = ExactLinear.apply(x, weight, bias)
    assert torch.equal(y[0], bias)
    for bad in (float("inf"), float("nan")):
        x[2, 0] = bad
        assert ExactLinear.apply(x, weight, bias).isnan().all()  # the batch shares a grid, and so the NaN
    weight[0, 0] = float("inf")
    assert ExactLinear.apply(torch.ones(2, 4), weight, bias).isnan().all()


def test_an_empty_batch_has_empty_products_and_zero_gradients():
    """A process of a distributed training may get no image of the last batch."""
    x, weight, bias = torch.zeros(0, 4), torch.randn(3, 4), torch.randn(3)
    y, grad_x, grad_weight, grad_bias = linear_with_grads(ExactLinear.apply, x, weight, bias, torch.zeros(0, 3))
    assert y.shape == (0, 3) and grad_x.shape == (0, 4)
    assert not grad_weight.any() and not grad_bias.any()


def test_a_grid_rounds_to_nearest_below_the_largest_magnitude():
    t = torch.tensor([[3.0, -1.0, 2.0**-30, 1e-20], [0.0, 0.1, -0.2, 0.005]])
    rounded, unit = on_grid(t)
    assert unit == 2.0**-6  # 3 < 2**2: steps of 2**(2 - 8)
    assert torch.equal(rounded, (t / unit).round() * unit)  # to nearest, ties to even
    assert (rounded / unit).abs().max() <= 2**GRID_BITS
    assert on_grid(torch.tensor([1.0, 0.0]))[1] == 2.0**-7  # 1 = 2**0 needs the 2**1 boundary above it
    assert on_grid(torch.tensor([1e-20, -3e-25]))[1] == 2.0**-47  # nothing below 2**-40 counts
    ties = torch.tensor([0.5, 1.5, 2.5, -2.5, 3.0 * 2**6]) * 2**-6
    assert (on_grid(ties)[0][:4] / 2**-6).tolist() == [0.0, 2.0, 2.0, -2.0]
    assert on_grid(torch.tensor([1.0, float("inf")]))[0].isnan().all()
    assert on_grid(torch.tensor([1.0, float("nan")]))[0].isnan().all()


def test_with_exact_products_on_every_way_to_a_product_is_exact(tmp_path):
    """Linear layers of any shape, with and without gradients, the plain products and what comes down
    to them, and the exported models: once use_exact_products() has run, the process computes none
    of them with the BLAS library's own float32 product; and again as torch does when it is off."""
    generator = torch.Generator().manual_seed(4)
    a, b, v = (torch.randn(*shape, generator=generator) for shape in [(6, 784), (784, 10), (784,)])
    batch1, batch2 = torch.randn(3, 6, 784, generator=generator), torch.randn(3, 784, 10, generator=generator)
    bias = torch.randn(10, generator=generator)
    layer = torch.nn.Linear(784, 10)
    model = MLP([16])
    images = torch.rand(6, 1, 28, 28, generator=generator)
    # Programs of torch's own operations (the shipped model's files compute their own arithmetic: shipped.py).
    torchscript = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(model), torchscript)
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (images,)), program)

    def products() -> dict[str, torch.Tensor]:
        x = torch.rand(2, 3, 784, generator=torch.Generator().manual_seed(5), requires_grad=True)
        y = layer(x)
        y.sum().backward()
        with torch.inference_mode():
            inferred = layer(a)
        return {
            "linear": y.detach(),
            "linear's input gradient": x.grad,
            "linear under inference_mode": inferred,
            "mm": a @ b,
            "addmm": torch.addmm(bias, a, b),
            "einsum": torch.einsum("ik,kj->ij", a, b),
            "mv": a @ v,
            "dot": v @ v,
            "bmm": batch1 @ batch2,
            "addbmm": torch.addbmm(bias, batch1, batch2),
            "TorchScript": load_torchscript(torchscript)(images),
            "torch.export": torch.export.load(program).module()(images),
        }

    with torch.no_grad():
        x = torch.rand(2, 3, 784, generator=torch.Generator().manual_seed(5))
        hidden = exact_matmul((images.flatten(1) - model.mean) / model.std, model.layers[0].weight.T)
        hidden = hidden.add_(model.layers[0].bias).relu_()
        logits = exact_matmul(hidden, model.layers[2].weight.T).add_(model.layers[2].bias)
        exact = {
            "linear": (exact_matmul(x.view(6, 784), layer.weight.T) + layer.bias).view(2, 3, 10),
            "linear's input gradient": exact_matmul(torch.ones(6, 10), layer.weight).view(2, 3, 784),
            "linear under inference_mode": exact_matmul(a, layer.weight.T) + layer.bias,
            "mm": exact_matmul(a, b),
            "addmm": exact_matmul(a, b) + bias,
            "einsum": exact_matmul(a, b),
            "mv": exact_matmul(a, v[:, None])[:, 0],
            "dot": exact_matmul(v[None], v[:, None])[0, 0],
            "bmm": exact_matmul(batch1, batch2),
            "addbmm": exact_matmul(batch1.transpose(0, 1).reshape(6, -1), batch2.reshape(-1, 10)) + bias,
            "TorchScript": logits,
            "torch.export": logits,
        }
    use_exact_products()
    for name, result in products().items():
        assert torch.equal(result, exact[name]), name
    use_exact_products(False)
    assert torch.equal(a @ b, library_product(a, b))
    assert not torch.equal(a @ b, exact["mm"])  # the machine's own again


def test_products_do_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(2)
    x, weight, bias, grad_y = (
        torch.randn(*shape, generator=generator) for shape in [(256, 784), (520, 784), (520,), (256, 520)]
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(linear_with_grads(ExactLinear.apply, x, weight, bias, grad_y))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# The module of each stage, from its command in dvc.yaml (`python -m stages.<name> ...`).
STAGES = [stage["cmd"].split()[2] for stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].values()]


@pytest.mark.skipif(not X86_64, reason="the kernels are pinned on x86-64 only")
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_pins_the_kernels_before_torch_loads(stage):
    """Started as dvc.yaml starts it, with none of the settings in its environment."""
    probe = f"import os, {stage}, torch; print(os.environ.get('ATEN_CPU_CAPABILITY'))\n"
    probe += "print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT, env=user_environment(), capture_output=True, text=True, check=True
    )
    setting, capability = result.stdout.split()
    assert setting == KERNELS["ATEN_CPU_CAPABILITY"]
    if torch.cpu.get_capabilities().get("avx2"):
        assert capability == "AVX2"


@pytest.mark.skipif(not X86_64, reason="the kernels are pinned on x86-64 only")
def test_a_training_whose_torch_picked_other_kernels_is_refused(tmp_path):
    """torch loaded, and its kernels picked, before the stage could pin them: one line, no training."""
    script = (
        "import runpy, sys, torch\n"
        "torch.ones(1).exp()\n"  # picks the kernels, here ATen's plain C++ ones
        "sys.argv[0] = 'stages.train'\n"
        "runpy.run_module('stages.train', run_name='__main__')\n"
    )
    arguments = ["--params", str(PROJECT / "params.yaml"), "--data", str(tmp_path)]
    arguments += ["--checkpoint", str(tmp_path / "checkpoint.pt"), "--live", str(tmp_path / "live")]
    arguments += ["--augmented", str(tmp_path / "augmented.gif")]
    result = subprocess.run(
        [sys.executable, "-c", script, *arguments],
        cwd=PROJECT,
        env=user_environment(ATEN_CPU_CAPABILITY="default"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: params.yaml: train.arithmetic is portable, which needs ATen's AVX2 kernels, but torch picked its "
        "kernels before ATEN_CPU_CAPABILITY=avx2 was set (capability DEFAULT); set train.arithmetic: native"
    ]
    assert not (tmp_path / "checkpoint.pt").exists()
