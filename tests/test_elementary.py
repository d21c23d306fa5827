"""elementary.py's sine, cosine, tangent and exponential against Python's math (the C library's, within
a unit in the last place), over the ranges that augmentation and the shipped softmax use, with bounds
a few times the errors measured (in units of float64's epsilon, 2**-52, or of the last place)."""

import math

import torch

from mnist_pipeline.elementary import exp, sin_cos, tan

EPSILON = 2.0**-52
SMALLEST_NORMAL = 2.0**-1022


def reference(function, x: torch.Tensor) -> torch.Tensor:
    """`function` of math on each element, in float64."""
    return torch.tensor([function(value) for value in x.double().tolist()], dtype=torch.float64)


def last_places(x: torch.Tensor) -> torch.Tensor:
    """The unit in the last place of each element, in x's dtype, as float64."""
    return (torch.nextafter(x.abs(), torch.tensor(math.inf, dtype=x.dtype)) - x.abs()).double()


def angles(dtype: torch.dtype) -> torch.Tensor:
    """Two turns either way, evenly and at random, with the points where sine or cosine is 0 or 1."""
    even = torch.linspace(-2 * math.pi, 2 * math.pi, 100_001, dtype=torch.float64)
    drawn = (torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 4 * math.pi
    special = torch.tensor([0.0, math.pi / 2, -math.pi / 2, math.pi, -math.pi, 1e-300, -1e-8], dtype=torch.float64)
    return torch.cat([even, drawn, special]).to(dtype)


def test_sine_and_cosine_are_within_8_epsilons_of_maths():
    """Measured: 6.1 epsilons at most (5.1 within a half turn), an absolute error: near a multiple of pi
    the reduction to [-pi, pi] leaves about one epsilon of 2 pi, which no relative bound could hold."""
    x = angles(torch.float64)
    sine, cosine = sin_cos(x)
    assert (sine - reference(math.sin, x)).abs().max() <= 8 * EPSILON
    assert (cosine - reference(math.cos, x)).abs().max() <= 8 * EPSILON


def test_tangent_is_within_32_last_places_of_maths():
    """Measured: 20 at most, within the angles that shear uses (under 90 degrees either way)."""
    x = torch.linspace(-1.5, 1.5, 100_001, dtype=torch.float64)
    expected = reference(math.tan, x)
    assert ((tan(x) - expected).abs() / last_places(expected)).max() <= 32


def test_exponential_is_within_2048_epsilons_of_maths_relative():
    """Measured: 1,515 epsilons at most over float64's normal results (squaring ten times multiplies
    the series' error by about 2**10); below them exp is 0, and above 709.78 infinite, as in math."""
    x = torch.cat([torch.linspace(-708, 709, 200_001, dtype=torch.float64), torch.linspace(-20, 20, 100_001)])
    expected = reference(math.exp, x)
    assert (expected >= SMALLEST_NORMAL).all()
    assert ((exp(x) - expected).abs() / expected).max() <= 2048 * EPSILON
    extremes = exp(torch.tensor([-1000.0, 710.0, 1000.0], dtype=torch.float64))
    assert extremes.tolist() == [0.0, math.inf, math.inf]


def test_float32_results_are_within_one_last_place_of_maths():
    """In float32, as augmentation and the shipped model take them: the float64 errors above are far
    below float32's last place, so each result is math's rounded to float32, or its neighbour."""
    x = angles(torch.float32)
    sine, cosine = sin_cos(x)
    for got, function in ((sine, math.sin), (cosine, math.cos)):
        expected = reference(function, x).float()
        assert ((got.double() - expected.double()).abs() <= last_places(expected)).all()
    x = torch.linspace(-100, 80, 100_001, dtype=torch.float32)
    expected = reference(math.exp, x).float()
    assert ((exp(x).double() - expected.double()).abs() <= last_places(expected)).all()
    assert sine.dtype == cosine.dtype == exp(x).dtype == torch.float32
