"""MNIST's IDX files: reading, validating, and turning them into tensors."""

from pathlib import Path

import numpy as np
import torch

from mnist_pipeline.stage import PipelineError

# The four files of the dataset, by split: (images, labels).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28
NUM_CLASSES = 10

# An IDX header is two zero bytes, a type code (0x08 = unsigned byte), the number of
# dimensions, then one big-endian uint32 per dimension.
UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file into an array of the shape its header declares."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != UNSIGNED_BYTE:
        raise PipelineError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = int(data[3])
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise PipelineError(f"{path}: truncated IDX header")
    shape = tuple(int(n) for n in data[4:header_size].view(">u4"))
    expected = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise PipelineError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return data[header_size:].reshape(shape)


def load_idx_images(path: Path) -> np.ndarray:
    """Images as uint8 [N, 28, 28]."""
    images = read_idx(path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise PipelineError(f"{path}: expected images of shape [N, 28, 28], got {list(images.shape)}")
    return images


def load_idx_labels(path: Path) -> np.ndarray:
    """Labels as uint8 [N], each in 0..9."""
    labels = read_idx(path)
    if labels.ndim != 1:
        raise PipelineError(f"{path}: expected labels of shape [N], got {list(labels.shape)}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise PipelineError(f"{path}: expected labels in 0..9, found {labels.max()}")
    return labels


def load_mnist(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split ("train" or "test") from `data_dir`."""
    images_name, labels_name = MNIST_FILES[split]
    images = load_idx_images(data_dir / images_name)
    labels = load_idx_labels(data_dir / labels_name)
    if len(images) != len(labels):
        raise PipelineError(
            f"{data_dir}: {images_name} has {len(images)} images but {labels_name} has {len(labels)} labels"
        )
    return images, labels


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)  # one writable buffer, shared by the tensors made from it
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run the download stage: dvc repro download)") from None
    except OSError as error:
        raise PipelineError(f"{path}: cannot read ({error.strerror})") from None


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 784] (as compact as the files), labels as int64 [N], both on `device`."""
    x = torch.from_numpy(images.reshape(len(images), -1)).to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    return x, y


def scale_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], what the model takes."""
    return images.float().div_(255)
