"""sin, cos, tan and exp from additions, multiplications and divisions alone: the same bits on every CPU.

torch's own sin, cos, tan, exp and log on CPU tensors run neither ATen's pinned kernels nor the C
library's functions: in torch's x86-64 wheels they are MKL's vector math, which picks its code by
the CPU's vendor and instruction set, so an AMD and an Intel CPU round some results differently
(docs/reproducibility.md). IEEE 754 rounds every single addition, multiplication and division
correctly wherever it runs, so a function made of those alone, one torch operation each (none
that a compiler could fuse into another), in a fixed order, gives the same bits everywhere.

The functions below work in float64 with Taylor series that reach float64's precision, and
return the input's dtype; they serve augmentation's few values per image (augment.py), where
their cost is small against the rest of a step, and the shipped model's softmax (shipped.py),
which TorchScript compiles into models/model.pt: so exp keeps its constants inside, as
TorchScript reads no module-level numbers.
"""

import math

import torch

# Terms of the sine and cosine series: for |x| <= pi the first term left out is below 3e-17.
TRIGONOMETRIC_TERMS = 14


def sin_cos(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin x, cos x), elementwise, in x's dtype."""
    x64 = x.double()
    # The argument reduced to [-pi, pi]: x - 2 pi k, k the nearest integer to x / (2 pi).
    x64 = x64 - (x64 / math.tau).round_() * math.tau
    square = x64 * x64
    # Horner's scheme from the last term: sin x = x (1 - x^2/(2*3) (1 - x^2/(4*5) (...))), cos alike.
    sin = torch.ones_like(square)
    cos = torch.ones_like(square)
    for k in range(TRIGONOMETRIC_TERMS, 0, -1):
        sin = 1 - square * sin * (1 / ((2 * k) * (2 * k + 1)))
        cos = 1 - square * cos * (1 / ((2 * k - 1) * (2 * k)))
    return (x64 * sin).to(x.dtype), cos.to(x.dtype)


def tan(x: torch.Tensor) -> torch.Tensor:
    """tan x, elementwise, in x's dtype (from float64 sine and cosine)."""
    sin, cos = sin_cos(x.double())
    return (sin / cos).to(x.dtype)


def exp(x: torch.Tensor) -> torch.Tensor:
    """e ** x, elementwise, in x's dtype."""
    # exp(x) = exp(x / 2**10) ** (2**10): the series then needs |x| / 2**10 < 0.73, where 20 terms reach
    # float64's precision; squaring ten times multiplies the relative error by about 2**10.
    halvings, terms = 10, 20
    y = x.double().clamp(-746.0, 710.0) / 2**halvings  # exp is 0 below, and infinite above, in float64
    result = torch.ones_like(y)
    for k in range(terms, 0, -1):  # 1 + y (1 + y/2 (1 + y/3 (...)))
        result = 1 + y * result * (1 / k)
    for _ in range(halvings):
        result = result * result
    return result.to(x.dtype)
