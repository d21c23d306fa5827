"""The model as it ships (mnist_pipeline/shipped.py): the portable arithmetic with a grid for each image,
so that an image's logits depend on nothing but the image and the weights."""

import itertools
import math

import pytest
import torch
from conftest import synthetic_split

from mnist_pipeline.exact import GRID_BITS, exact_products_paused, exact_products_used, on_grid, use_exact_products
from mnist_pipeline.metrics import evaluate
from mnist_pipeline.model import MLP
from mnist_pipeline.shipped import GridLinear, ShippedMLP, evaluate_shipped, logits_bytes, logits_from_bytes, softmax


@pytest.fixture(scope="module")
def model() -> MLP:
    torch.manual_seed(3)
    return MLP([520, 320, 240, 120]).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """1000 synthetic digits as float32 [N, 1, 28, 28], a third of them faint (their brightest pixel 20 to
    60 of 255): their activations are smaller than their neighbours', and so would be their grids."""
    pixels = torch.from_numpy(synthetic_split(1000, seed=5)[0]).float()
    faint = torch.arange(1000) % 3 == 0
    pixels[faint] *= torch.linspace(20, 60, int(faint.sum()))[:, None, None] / 255
    return (pixels.round() / 255).unsqueeze(1)


def test_each_row_is_rounded_as_on_grid_rounds_it_alone():
    """Rows of every scale, a row of zeros, one below the smallest grid, and rows with an infinity or a
    NaN (which become NaN, and leave the other rows alone)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 300, generator=generator) * torch.tensor([1, 1e3, 1e-3, 2.0**30, 0, 1e-20, 1, 1])[:, None]
    x[6, 7], x[7, 9] = math.inf, math.nan
    rounded = GridLinear(torch.nn.Linear(300, 1)).rounded(x)
    for row in range(6):
        alone, unit = on_grid(x[row : row + 1])
        assert torch.equal(rounded[row : row + 1], alone), row
        assert (rounded[row] / unit).abs().max() <= 2**GRID_BITS
    assert not rounded[4].any() and not rounded[5].any()
    assert rounded[6:].isnan().all()


def test_an_image_alone_is_computed_as_training_computes_it(model, images):
    """For a batch of one, a grid per image is training's grid per batch: the shipped model's logits are
    the training model's with exact products on (exact.py), bit for bit."""
    shipped = ShippedMLP(model)
    use_exact_products()
    with torch.no_grad():
        for index in (0, 1, 3, 999):
            image = images[index : index + 1]
            with exact_products_paused():
                alone = shipped(image)
            assert torch.equal(alone, model(image)), index


def test_an_images_logits_do_not_depend_on_its_batch(model, images):
    """Batches of 1, 7, 64 and 1000, and the batch reversed: the same bits in every row. The negative
    control: training's grids, one per batch, give the faint digits other logits in a batch than alone."""
    shipped = ShippedMLP(model)
    with torch.no_grad():
        whole = shipped(images)
        for size in (1, 7, 64):
            assert torch.equal(torch.cat([shipped(images[i : i + size]) for i in range(0, len(images), size)]), whole)
        assert torch.equal(shipped(images.flip(0)).flip(0), whole)
        use_exact_products()
        per_batch, alone = model(images), torch.cat([model(images[i : i + 1]) for i in range(len(images))])
    assert not torch.equal(per_batch, alone)


def test_every_product_is_exact_and_the_chunks_are_added_in_order(model, images):
    """The logits equal float64 arithmetic on the same grids: each chunk's product exact, the chunks and the
    bias added in float32 in order; and a product of torch's own (exact products paused) computes them."""
    shipped = ShippedMLP(model)
    x = ((images.flatten(1) - model.mean) / model.std).double()
    for layer in shipped.layers:
        if isinstance(layer, torch.nn.ReLU):
            x = x.relu()
            continue
        x = layer.rounded(x.float()).double()
        bounds = layer.bounds
        assert max(b - a for a, b in itertools.pairwise(bounds)) <= 256
        sums = [(x[:, a:b] @ layer.weight[a:b].double()).float() for a, b in itertools.pairwise(bounds)]
        y = sums[0]
        for chunk in sums[1:]:
            y = y + chunk
        x = (y + layer.bias).double()
    use_exact_products()
    with torch.no_grad(), exact_products_paused():
        assert not exact_products_used()
        assert torch.equal(shipped(images), x.float())
    assert exact_products_used()


def test_the_softmax_is_within_a_unit_in_the_last_place_of_the_exact_one():
    generator = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.randn(500, 10, generator=generator) * 10, torch.full((1, 10), -1e30)])
    logits[0, 3] = 90.0  # exp(90) overflows float32: the softmax does not
    probabilities = softmax(logits)
    reference = torch.softmax(logits.double(), dim=1)
    assert probabilities.dtype == torch.float32 and probabilities.shape == logits.shape
    ulp = torch.nextafter(reference.float(), torch.tensor(math.inf)) - reference.float()
    assert ((probabilities.double() - reference).abs() <= ulp.double()).all()
    assert torch.equal(torch.jit.script(softmax)(logits), probabilities)


def test_evaluate_shipped_measures_the_shipped_model_in_a_training_process(model, images):
    """With exact products on, as in a training, the per-epoch test pass still measures the shipped model."""
    pixels = (images * 255).round().to(torch.uint8).flatten(1)
    labels = torch.arange(len(images)) % 10
    use_exact_products()
    shipped = evaluate_shipped(model, pixels, labels)
    assert exact_products_used()
    use_exact_products(False)
    assert torch.equal(shipped.logits, evaluate(ShippedMLP(model), pixels, labels).logits)


def test_logits_travel_as_little_endian_float32_rows(model, images):
    logits = ShippedMLP(model)(images[:3]).detach()
    content = logits_bytes(logits)
    assert content == logits.numpy().astype("<f4").tobytes() and len(content) == 3 * 10 * 4
    assert torch.equal(logits_from_bytes(content, 3), logits)
    with pytest.raises(ValueError, match=r"expected 4 x 10 float32 logits \(160 bytes\), found 120 bytes"):
        logits_from_bytes(content, 4)
