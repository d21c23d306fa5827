import dataclasses

import pytest
import torch
from conftest import NO_AUGMENTATION, synthetic_split

from mnist_pipeline.augment import EXAMPLE_DRAWS, NOISE_SCALE, SMOOTHING_BITS, Augmentation, examples, gaussian_matrix
from mnist_pipeline.data import scale_pixels, to_tensors
from mnist_pipeline.params import AugmentParams

CPU = torch.device("cpu")
STRONG = AugmentParams(rotation=15, scale=0.15, shear=10, translation=2, elastic_alpha=34, elastic_sigma=5)


def digits(count: int = 32) -> torch.Tensor:
    """Float [count, 784] synthetic digits in [0, 1]."""
    images, _ = to_tensors(*synthetic_split(count, seed=3), CPU)
    return scale_pixels(images)


@pytest.mark.parametrize("params", [NO_AUGMENTATION, dataclasses.replace(NO_AUGMENTATION, elastic_sigma=4.0)])
def test_zero_strength_leaves_every_image_exactly_as_it_was(params):
    images = digits()
    augmented = Augmentation(params, seed=1, device=CPU)(images)
    assert torch.equal(augmented.flatten(1), images)


@pytest.mark.parametrize(
    "strength",
    [
        {"rotation": 15},
        {"scale": 0.15},
        {"shear": 10},
        {"translation": 2},
        {"elastic_alpha": 34, "elastic_sigma": 5},
    ],
)
def test_each_deformation_gives_each_image_of_a_batch_its_own(strength):
    one = digits(1)
    augmented = Augmentation(dataclasses.replace(NO_AUGMENTATION, **strength), seed=1, device=CPU)(one.expand(16, -1))
    assert not torch.equal(augmented[0], one.view(1, 28, 28))  # it deforms
    distinct = {augmented[i].numpy().tobytes() for i in range(16)}
    assert len(distinct) == 16  # and no two copies of the same image alike


def test_the_same_seed_gives_the_same_batch_and_every_batch_is_drawn_afresh():
    images = digits()
    first, again, other = (Augmentation(STRONG, seed, CPU) for seed in (1, 1, 2))
    batch = first(images)
    assert torch.equal(batch, again(images))
    assert not torch.equal(batch, other(images))
    assert not torch.equal(first(images), batch)  # the next batch (epoch) draws new deformations


def test_an_image_stays_in_its_place_so_its_label_still_fits():
    """Each output image is its own input image deformed by its own draw, whatever else is in the
    batch: a share of the batch (as a process of a distributed training takes) gets exactly the
    rows of the whole batch's output."""
    images = digits(12)
    whole = Augmentation(STRONG, seed=1, device=CPU)(images)
    for share in (slice(0, None, 3), slice(1, None, 3), slice(2, None, 3), slice(5, 6)):
        part = Augmentation(STRONG, seed=1, device=CPU)(images[share], batch_size=len(images), share=share)
        assert torch.equal(part, whole[share])
    # And what lands in a row comes from that row's image alone: ink in one image stays in its row.
    for row in (0, 7, 11):
        alone = torch.zeros_like(images)
        alone[row] = images[row]
        inked = Augmentation(STRONG, seed=1, device=CPU)(alone).flatten(1).sum(1) > 0
        assert torch.equal(inked, torch.arange(len(images)) == row)


def test_strengths_keep_the_digit_in_the_frame_and_pixels_in_range():
    images = digits(64)
    augmented = Augmentation(STRONG, seed=1, device=CPU)(images).flatten(1)
    assert augmented.min() >= 0 and augmented.max() <= 1
    kept = augmented.sum(1) / images.sum(1)  # ink, which a scale of 0.85-1.15 changes by at most ~30%
    assert kept.min() > 0.6 and kept.max() < 1.5


def test_the_elastic_field_is_smoothed_exactly():
    """The smoothing's float64 products hold integers only, small enough to be exact: the same
    as integer arithmetic, in whichever order the BLAS library adds."""
    smoothing = gaussian_matrix(6.0).mul_(2**SMOOTHING_BITS).round_()
    noise = torch.full((2, 28, 28), NOISE_SCALE, dtype=torch.float64)
    noise[1] = -noise[1]  # the largest values, of both signs
    noise[:, ::2, 1::2] = torch.randint(-NOISE_SCALE, NOISE_SCALE + 1, (2, 14, 14), dtype=torch.float64)
    exact = smoothing.long() @ noise.long() @ smoothing.long()
    assert torch.equal(smoothing @ noise @ smoothing, exact.double())
    assert exact.abs().max() < 2**53


def test_the_gaussian_matrix_smooths_without_changing_a_constant_inside_the_image():
    smoothing = gaussian_matrix(2.0)
    assert torch.allclose(smoothing.sum(1)[8:20], torch.ones(12, dtype=torch.float64))
    assert torch.equal(smoothing, smoothing.T)
    assert smoothing[0, 0] == smoothing.max()


def test_the_examples_picture_shows_each_digit_then_its_deformations():
    images, labels = to_tensors(*synthetic_split(200, seed=0), CPU)
    rows = examples(images, labels, STRONG, seed=1)
    assert rows.shape == (1 + EXAMPLE_DRAWS, 10, 1, 28, 28)
    first = [int(torch.nonzero(labels == digit)[0, 0]) for digit in range(10)]
    assert torch.equal(rows[0].flatten(1), scale_pixels(images[first]))
    assert all(not torch.equal(rows[draw], rows[0]) for draw in range(1, 1 + EXAMPLE_DRAWS))
    assert torch.equal(
        examples(images, labels, NO_AUGMENTATION, seed=1)[1:], rows[0].expand(EXAMPLE_DRAWS, -1, -1, -1, -1)
    )
