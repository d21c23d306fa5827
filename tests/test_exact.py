"""The portable arithmetic: exact matrix products (mnist_pipeline/exact.py) and the kernels every stage pins."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PROJECT, user_environment

from mnist_pipeline.exact import ExactLinear, exact_matmul, integer_grid, library_product, use_exact_products
from mnist_pipeline.export import exported_program_bytes, torchscript_bytes
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


def test_products_are_within_float32_accuracy_of_float64_ones():
    """Each operand keeps at least 21 bits relative to the largest entry of its row (left) or column
    (right), so an entry of a @ b is off by at most 2**-21 * (max|a_i| sum|b_j| + sum|a_i| max|b_j|),
    plus float32's rounding of the result (and of the bias added to it)."""
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
        a, b = a.abs(), b.abs()
        grid = a.amax(1, keepdim=True) * b.sum(0) + a.sum(1, keepdim=True) * b.amax(0)
        error = (got.double() - expected).abs().view(grid.shape)
        assert (error <= 2**-21 * grid + 2**-23 * expected.abs().view(grid.shape)).all()


def test_an_all_zero_row_gives_the_bias_and_a_non_finite_value_gives_nan():
    weight, bias = torch.randn(3, 4), torch.randn(3)
    x = torch.zeros(3, 4)
    x[1, 2] = float("inf")
    x[2, 0] = float("nan")
    y = ExactLinear.apply(x, weight, bias)
    assert torch.equal(y[0], bias)
    assert y[1:].isnan().all()
    weight[0, 0] = float("inf")
    assert ExactLinear.apply(torch.ones(2, 4), weight, bias)[:, 0].isnan().all()


def test_the_grid_keeps_every_integer_within_its_bits():
    t = torch.tensor([[3.0, -1.0, 2.0**-30, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-30, -2e-30, 0.0, 5e-31]])
    m, unit = integer_grid(t, 1, bits=10)
    assert torch.equal(m, m.round()) and (m.abs() <= 2**10).all()
    assert unit.flatten().tolist() == [2.0**-8, 2.0**-73, 2.0**-73]  # 4 <= 2**10 * 2**-8; the rest floored
    assert (m * unit.double() - t.double()).abs().max() <= 2.0**-9


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
    torchscript = tmp_path / "model.pt"
    torchscript.write_bytes(torchscript_bytes(model))
    program = tmp_path / "model.pt2"
    program.write_bytes(exported_program_bytes(model))

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


# Exact products and their gradients on fixed data, as a hash; run under each of MKL's code paths.
HASH_PRODUCTS = """
import hashlib, torch
from mnist_pipeline.exact import ExactLinear
generator = torch.Generator().manual_seed(3)
shapes = [(64, 784), (520, 784), (520,), (64, 520)]
x, weight, bias, grad_y = (torch.randn(*shape, generator=generator) for shape in shapes)
leaves = [t.requires_grad_() for t in (x, weight, bias)]
y = ExactLinear.apply(*leaves)
y.backward(grad_y)
print(hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in (y, *(leaf.grad for leaf in leaves)))).hexdigest())
"""


def test_products_do_not_depend_on_the_blas_code_path():
    """MKL picks its kernels for the CPU at hand; MKL_CBWR makes it take those of an older one. The
    exact products come out the same on each, as they do on another CPU."""
    hashes = {
        branch: subprocess.run(
            [sys.executable, "-c", HASH_PRODUCTS],
            cwd=PROJECT,
            env=user_environment(**({"MKL_CBWR": branch} if branch else {})),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for branch in ("", "COMPATIBLE", "AVX2")
    }
    assert len(set(hashes.values())) == 1, hashes
