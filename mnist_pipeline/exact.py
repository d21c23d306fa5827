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

No product escapes: `use_exact_products()` registers, through torch.library, this module's
kernels for aten::linear (at the autograd level, so that ExactLinear computes both gradients)
and for every other float32 matrix product (mm, addmm, bmm, ..., on the CPU and CUDA). From
then on the process computes every one exactly, whichever code reaches it: a training step, a
test pass, the evaluation, a TorchScript or torch.export program, a product added later.
"""

import warnings

import torch
from torch.nn import functional as F

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


def library_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for matrices or batches of them, by the BLAS library itself: through the out= variant of
    mm or bmm, which use_exact_products leaves alone."""
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=out)


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for float32 matrices (or batches of them), from `a` rounded per row and `b` per column to a
    grid of integers that share the 53 bits of float64 (see integer_grid), rounded once to float32."""
    terms = a.shape[-1]
    bits = FLOAT64_INTEGER_BITS - (terms - 1).bit_length()  # a sum of `terms` products stays within 2**53
    ma, ua = integer_grid(a, -1, bits // 2)
    mb, ub = integer_grid(b, -2, bits - bits // 2)
    return library_product(ma, mb).float().mul_(ua).mul_(ub)


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
    y = ExactLinear.apply(input.reshape(-1, input.shape[-1]), weight, bias)
    return y.view(*input.shape[:-1], y.shape[-1])


# Whether the kernels registered by use_exact_products compute exactly, or as torch does.
_exact = False
_library: torch.library.Library | None = None


def use_exact_products(enabled: bool = True) -> None:
    """From now on, compute every float32 matrix product of this process exactly (or, with
    enabled=False, as torch does). Stages call it once, before any product."""
    global _exact, _library
    if enabled and _library is None:
        _library = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            # torch says that these replace its own kernels, which is what they are for.
            warnings.filterwarnings("ignore", "Overriding a previously registered kernel", UserWarning)
            for device in ("CPU", "CUDA"):
                _library.impl("linear", _linear, f"Autograd{device}")
                for name, exact_kernel in EXACT_KERNELS.items():
                    _library.impl(name, _switched(name, exact_kernel), device)
    _exact = enabled


def exact_products_used() -> bool:
    """Whether use_exact_products is on."""
    return _exact


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _exact and input.dtype == weight.dtype == torch.float32:
        return exact_linear(input, weight, bias)
    return torch.ops.aten.linear.default.decompose(input, weight, bias)  # torch's own linear


def _switched(name: str, exact_kernel):
    """The kernel registered for the product `name`: `exact_kernel` for float32 while use_exact_products
    is on, else torch's own, reached through the op's out= variant (which stays torch's)."""
    in_place = name.endswith("_")
    native = getattr(torch.ops.aten, name.rstrip("_")).out

    def kernel(*args, **kwargs):
        if _exact and all(t.dtype == torch.float32 for t in args if isinstance(t, torch.Tensor)):
            result = exact_kernel(*args, **kwargs)
            return args[0].copy_(result) if in_place else result
        return native(*args, **kwargs, out=args[0] if in_place else args[0].new_empty(0))

    return kernel


def _scaled_sum(product: torch.Tensor, input: torch.Tensor, beta: complex, alpha: complex) -> torch.Tensor:
    """beta * input + alpha * product, as addmm and its kin define it: `input` is ignored where beta is 0."""
    if alpha != 1:
        product = product.mul_(alpha)
    if beta == 0:
        return product
    return product.add_(input if beta == 1 else input * beta)


def _addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(mat1, mat2), input, beta, alpha)


def _addmm_activation(input, mat1, mat2, *, beta=1, alpha=1, use_gelu=False) -> torch.Tensor:
    result = _addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    return F.gelu(result, approximate="tanh") if use_gelu else result.relu_()


def _baddbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(batch1, batch2), input, beta, alpha)


def _addbmm(input: torch.Tensor, batch1: torch.Tensor, batch2: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    # The sum of the batch's products is one product over all their terms: [M, B*K] @ [B*K, N].
    rows, columns = batch1.shape[1], batch2.shape[2]
    product = exact_matmul(batch1.transpose(0, 1).reshape(rows, -1), batch2.reshape(-1, columns))
    return _scaled_sum(product, input, beta, alpha)


def _addmv(input: torch.Tensor, mat: torch.Tensor, vec: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    return _scaled_sum(exact_matmul(mat, vec[:, None])[:, 0], input, beta, alpha)


# Every op of torch's that multiplies matrices, vectors or batches of them (matmul, einsum,
# tensordot and the like come down to these), with its exact float32 version.
EXACT_KERNELS = {
    "mm": exact_matmul,
    "bmm": exact_matmul,
    "addmm": _addmm,
    "addmm_": _addmm,
    "_addmm_activation": _addmm_activation,
    "baddbmm": _baddbmm,
    "baddbmm_": _baddbmm,
    "addbmm": _addbmm,
    "addbmm_": _addbmm,
    "mv": lambda mat, vec: exact_matmul(mat, vec[:, None])[:, 0],
    "addmv": _addmv,
    "addmv_": _addmv,
    "dot": lambda a, b: exact_matmul(a[None], b[:, None]).view(()),
    "vdot": lambda a, b: exact_matmul(a[None], b[:, None]).view(()),
}


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
