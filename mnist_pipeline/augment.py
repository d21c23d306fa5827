"""Random deformations of the training digits, drawn per image and fresh for every batch.

Each image gets its own rotation, scale, shear and translation (an affine map) and, optionally,
an elastic distortion (Simard et al., 2003: a field of random displacements smoothed by a
Gaussian). The deformations of a whole batch become one tensor of sampling grids, and
torch.nn.functional.grid_sample reads every image of the batch through its own grid in one call.

torchvision's affine and elastic transforms draw one set of parameters per call, for the whole
batch, so the grids are built here, and built to give the same bits on every machine: with
element-wise operations, which run in ATen's pinned kernels (numerics.py), where torch's
affine_grid multiplies by the matrices in a batched product (in the BLAS library's own order);
with sines, cosines and exponentials made of additions and multiplications (elementary.py),
where torch's own are MKL's vector math, which rounds differently on other CPUs; and the
elastic field smoothed by two float64 products of integers, exact in any order, where a
Gaussian blur by conv2d runs whichever oneDNN kernel suits the CPU (and exact.py's general
products cost 40 times as much here).
"""

import math

import torch
import torch.nn.functional as F

from mnist_pipeline.data import IMAGE_SIZE, NUM_CLASSES, scale_pixels
from mnist_pipeline.elementary import exp, sin_cos
from mnist_pipeline.params import AugmentParams

# The generator of the deformations is seeded with train.seed plus this, so that its stream is
# not the one that shuffles (also seeded with train.seed on the CPU).
STREAM = 0xA06
DRAWS = 5  # per image: rotation, scale, shear, and the two translations, each uniform in [-1, 1)
EXAMPLE_DRAWS = 4  # augmented versions of each digit in the picture of examples
SMOOTHING_RADIUS = 4  # the Gaussian matrix is cut at 4 standard deviations, as scipy's gaussian_filter does
# The elastic field's noise is odd integers in [-255, 255] (over 255: uniform in [-1, 1] in steps of
# 2/255), and the Gaussian matrix is rounded to multiples of 2**-16 (and scaled by 2**16): a smoothed
# value is below 2**8 * 2**16 * 2**16, so every partial sum of both products is an integer that
# float64 holds exactly.
NOISE_SCALE = 255
SMOOTHING_BITS = 16


def is_identity(params: AugmentParams) -> bool:
    """Whether `params` leave every image as it is (every strength zero; elastic_sigma is no strength)."""
    return not any((params.rotation, params.scale, params.shear, params.translation, params.elastic_alpha))


def gaussian_matrix(sigma: float, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The float64 [size, size] matrix that smooths a signal of `size` samples with a Gaussian of
    standard deviation `sigma` samples (zero beyond the edges; every full row sums to 1)."""
    offsets = torch.arange(size, dtype=torch.float64)
    distance = offsets[:, None] - offsets[None, :]
    radius = math.ceil(SMOOTHING_RADIUS * sigma)
    kernel = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = exp(-(distance * distance) / (2 * sigma**2)) / exp(-(kernel * kernel) / (2 * sigma**2)).sum()
    return weights.masked_fill_(distance.abs() > radius, 0)


class Augmentation:
    """Deforms batches of training images, as `params` say, with a generator on `device` seeded by `seed`."""

    def __init__(self, params: AugmentParams, seed: int, device: torch.device) -> None:
        self.params = params
        self.deforms = not is_identity(params)  # else every call hands its images back untouched
        self.device = device
        self.generator = torch.Generator(device).manual_seed((seed + STREAM) % 2**64)
        self.smoothing = None
        if params.elastic_alpha:
            # float64 has no place on mps, where the arithmetic is the machine's own anyway (train.arithmetic native).
            wide = torch.float32 if device.type == "mps" else torch.float64
            self.smoothing = gaussian_matrix(params.elastic_sigma).mul_(2**SMOOTHING_BITS).round_().to(device, wide)
        # Pixel centres in grid_sample's coordinates (align_corners=False): -1 and 1 are the image's outer edges.
        centres = (torch.arange(IMAGE_SIZE, dtype=torch.float32, device=device) * 2 + 1) / IMAGE_SIZE - 1
        self.x = centres.expand(IMAGE_SIZE, IMAGE_SIZE)  # [row, column] -> the column's x
        self.y = self.x.T

    def __call__(self, images: torch.Tensor, batch_size: int | None = None, share: slice = slice(None)) -> torch.Tensor:
        """Float `images` [B, 784] or [B, 1, 28, 28], deformed, in the shape of [B, 1, 28, 28].

        The deformations are drawn for `batch_size` images (default B) and `images` takes those of
        `share`: a process of a distributed training passes its share of the global batch, so the
        generator moves alike in every process and an image gets the same deformation at any
        process count.
        """
        images = images.view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        if not self.deforms:
            return images
        p = self.params
        count = len(images) if batch_size is None else batch_size
        draws = torch.rand(count, DRAWS, generator=self.generator, device=self.device).mul_(2).sub_(1)
        noise = None
        if self.smoothing is not None:
            # Four bytes of noise from each 32-bit draw: drawing byte by byte took half of augmentation's time.
            shape = (count, 2, IMAGE_SIZE, IMAGE_SIZE // 4)
            draws32 = torch.randint(
                -(2**31), 2**31, shape, generator=self.generator, device=self.device, dtype=torch.int32
            )
            noise = draws32.view(torch.int8)[share].to(self.smoothing.dtype).mul_(2).add_(1)
        angle, scale, shear, shift_x, shift_y = draws[share].T
        # Both angles' sines and cosines in one call: torch's own would be MKL's, whose bits depend on the CPU.
        sines, cosines = sin_cos(torch.stack((angle * math.radians(p.rotation), shear * math.radians(p.shear))))
        inverse_scale = 1 / (1 + scale * p.scale)  # the grid samples the source: its step is the inverse
        shear = sines[1] / cosines[1]  # the shear's tangent
        cos, sin = cosines[0] * inverse_scale, sines[0] * inverse_scale
        # Source = rotation @ shear @ (1 / scale) applied to each pixel centre, plus the translation (in pixels).
        unit = 2 / IMAGE_SIZE  # one pixel in grid coordinates
        source_x = column(cos) * self.x + column(cos * shear - sin) * self.y + column(shift_x * (p.translation * unit))
        source_y = column(sin) * self.x + column(sin * shear + cos) * self.y + column(shift_y * (p.translation * unit))
        if noise is not None:
            # G @ noise @ G (G is symmetric), then scaled back: the noise to [-1, 1], G to its own values,
            # and alpha pixels to grid coordinates.
            field = self.smoothing @ noise @ self.smoothing
            field = field.mul_(p.elastic_alpha * unit / (NOISE_SCALE * 4**SMOOTHING_BITS)).float()
            source_x = source_x + field[:, 0]
            source_y = source_y + field[:, 1]
        grid = torch.stack((source_x, source_y), dim=-1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def column(values: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1], to scale or shift each image's grid by its own value."""
    return values[:, None, None]


def examples(images: torch.Tensor, labels: torch.Tensor, params: AugmentParams, seed: int) -> torch.Tensor:
    """Float [1 + EXAMPLE_DRAWS, 10, 1, 28, 28]: the first of uint8 `images` [N, 784] with each
    label 0-9, then EXAMPLE_DRAWS rows of them deformed as `params` and `seed` say."""
    first = torch.stack([torch.nonzero(labels == digit)[0, 0] for digit in range(NUM_CLASSES)])
    originals = scale_pixels(images.index_select(0, first)).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    augmentation = Augmentation(params, seed, images.device)
    return torch.stack([originals] + [augmentation(originals) for _ in range(EXAMPLE_DRAWS)])
