"""Matrix products with the same bits on every machine: the other half of the portable arithmetic.

A float32 matrix product adds its terms in the order its BLAS library picks for the CPU at hand
and the thread count, and float addition is not associative. MKL's products differ in their
last bits between an Intel and an AMD CPU, and between 1 and 2 threads, even with its
reproducibility settings (MKL_CBWR: docs/reproducibility.md), and SGD grows those bits into
different weights. Here every operand is rounded to integers times a power of two, with one
power per row of the left operand and per column of the right one, and with few enough bits
that every product and every partial sum of those integers is exact in float64. MKL's float64
product then returns the exact sums whatever order it adds in, on any CPU and thread count, and
scaling them back and rounding once to float32 gives the same bits everywhere.

Each operand keeps 21 to 27 significant bits relative to the largest entry of its row (or
column), against float32's 24, so the results are as accurate as float32 products. They cost
a float64 product, about twice a float32 one, plus the rounding passes: `make bench` measures
the whole against train.arithmetic: native.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mnist_pipeline.numerics import KERNELS, X86_64
from mnist_pipeline.stage import PipelineError

FLOAT64_INTEGER_BITS = 53  # every integer up to 2**53 is exact in float64, and so is a sum that stays there
EXPONENT_BITS = 0x7F800000  # of a float32
SMALLEST_SCALE = 2.0**-64  # keeps every unit below a normal float32; a slice under it just keeps fewer bits


def integer_grid(t: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, unit): float64 integers m with |m| <= 2**bits, and a power of two `unit` for each slice of
    float32 `t` along `dim` (kept as a dimension of size 1), such that m * unit is t rounded to the grid.

    A NaN or infinity in a slice makes its unit infinite, and so its products NaN.
    """
    top = t.abs().amax(dim, keepdim=True)
    # 2**floor(log2(top)): the float's exponent bits alone.
    top.view(torch.int32).bitwise_and_(EXPONENT_BITS)
    unit = top.clamp_(min=SMALLEST_SCALE).mul_(2.0 ** (1 - bits))  # |t| < 2 * top = 2**bits * unit
    return t.div(unit).round_().double(), unit


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float32 matrices, from `a` rounded per row and `b` per column to a grid of integers that
    share the 53 bits of float64 (see integer_grid), rounded once to float32."""
    terms = a.shape[1]
    bits = FLOAT64_INTEGER_BITS - (terms - 1).bit_length()  # a sum of `terms` products stays within 2**53
    ma, ua = integer_grid(a, 1, bits // 2)
    mb, ub = integer_grid(b, 0, bits - bits // 2)
    return (ma @ mb).float().mul_(ua).mul_(ub)


def exact_sum(t: torch.Tensor) -> torch.Tensor:
    """The column sums of float32 `t`, from its columns rounded to integers that share float64's 53 bits."""
    m, unit = integer_grid(t, 0, FLOAT64_INTEGER_BITS - (len(t) - 1).bit_length())
    return m.sum(0).float().mul_(unit[0])


class ExactLinear(torch.autograd.Function):
    """F.linear (x @ weight.T + bias) for 2-dimensional x, and its gradients, by exact products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        y = exact_matmul(x, weight.T)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = exact_matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = exact_matmul(grad.T, x) if ctx.needs_input_grad[1] else None
        grad_bias = exact_sum(grad) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def exact_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with F.linear's signature, computed by ExactLinear (inputs of any leading shape)."""
    y = ExactLinear.apply(input.flatten(0, -2), weight, bias)
    return y.view(*input.shape[:-1], y.shape[-1])


class ExactProducts(TorchFunctionMode):
    """Within `with ExactProducts():`, every F.linear (so every nn.Linear) is an ExactLinear."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            return exact_linear(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def check_portable_kernels() -> None:
    """Refuse to compute portably where ATen runs other kernels than its AVX2 ones (see numerics.py)."""
    if not X86_64:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        if torch.cpu.get_capabilities().get("avx2"):
            settings = ", ".join(f"{name}={value}" for name, value in KERNELS.items())
            reason = f"torch picked its kernels before {settings} was set"
        else:
            reason = "this CPU has no AVX2"
        raise PipelineError(
            f"params.yaml: train.arithmetic is portable, which needs ATen's AVX2 kernels, but {reason} "
            f"(capability {capability}); set train.arithmetic: native"
        )
