import gzip
import re

import numpy as np
import pytest
import torch
from conftest import idx_bytes

from mnist_pipeline.data import load_idx_images, load_idx_labels, load_mnist, read_idx, scale_pixels, to_tensors
from mnist_pipeline.stage import PipelineError


def test_read_idx_returns_the_array_its_header_describes(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic number"),  # float type code
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic number"),
        (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "declares shape (5,) (13 bytes) but the file has 11"),
        (b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"abc", "but the file has 11 bytes"),
    ],
)
def test_malformed_idx_files_are_rejected_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=re.escape(message)) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_a_gzipped_file_is_not_mistaken_for_idx(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((1, 28, 28), np.uint8))))
    with pytest.raises(PipelineError, match="bad magic number"):
        read_idx(path)


def test_images_must_be_28_by_28(tmp_path):
    (tmp_path / "images").write_bytes(idx_bytes(np.zeros((2, 28, 27), np.uint8)))
    with pytest.raises(PipelineError, match=r"expected images of shape \[N, 28, 28\], got \[2, 28, 27\]"):
        load_idx_images(tmp_path / "images")


def test_labels_must_be_digits(tmp_path):
    (tmp_path / "labels").write_bytes(idx_bytes(np.array([0, 9, 10], np.uint8)))
    with pytest.raises(PipelineError, match=r"expected labels in 0\.\.9, found 10"):
        load_idx_labels(tmp_path / "labels")


def test_labels_must_be_one_dimensional(tmp_path):
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)))
    with pytest.raises(PipelineError, match=r"expected labels of shape \[N\], got \[2, 2\]"):
        load_idx_labels(tmp_path / "labels")


def test_load_mnist_pairs_images_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    loaded_images, loaded_labels = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def test_load_mnist_rejects_mismatched_counts(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 28, 28), np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(PipelineError, match="has 5 images but t10k-labels-idx1-ubyte has 4 labels"):
        load_mnist(tmp_path, "test")


def test_a_missing_file_says_which_stage_makes_it(tmp_path):
    with pytest.raises(PipelineError, match=r"t10k-images-idx3-ubyte: file not found \(run the download stage"):
        load_mnist(tmp_path, "test")


def test_to_tensors_keeps_pixels_compact_and_scale_pixels_maps_them_to_unit_range():
    images = np.array([[[0] * 28] * 27 + [[255] * 28]], np.uint8)
    x, y = to_tensors(images, np.array([7], np.uint8), torch.device("cpu"))
    assert x.shape == (1, 784) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [7]
    pixels = scale_pixels(x)
    assert pixels.dtype == torch.float32
    assert pixels.min().item() == 0.0 and pixels.max().item() == 1.0 and pixels.sum().item() == 28.0
