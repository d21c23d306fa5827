"""A user of models/model.pt and model.pt2 who has torch and nothing of this project. The tests run it in
a fresh, isolated Python (`python -I`, from /), so that it cannot import the project's code:

    python -I consumer.py THREADS PRECISION BATCHES IMAGES_IDX LABELS_IDX MODEL[@BATCHES]...

THREADS: torch.set_num_threads's count (0: torch's own choice). PRECISION: the float32 matrix
products' precision (torch.set_float32_matmul_precision: "highest", torch's default, or "high" or
"medium", which let products round their operands to TF32 or bf16). BATCHES: comma-separated batch
sizes (0: all the images at once), for each model that names none of its own after an @. It prints
JSON: the thread count, ATen's kernels, the project's modules that were imported (none), and for
each model (by path) and batch size the accuracy and the sha256 of the logits as the model card
takes it (float32 [N, 10], row-major, little-endian); for a TorchScript file also the sha256 of its
probabilities at its first batch size.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def read_idx(path: str, dimensions: int) -> torch.Tensor:
    """An unsigned-byte IDX file: a 4-byte magic number, a big-endian uint32 per dimension, the bytes."""
    content = Path(path).read_bytes()
    shape = [int.from_bytes(content[4 + 4 * d : 8 + 4 * d], "big") for d in range(dimensions)]
    return torch.frombuffer(bytearray(content[4 + 4 * dimensions :]), dtype=torch.uint8).view(shape)


threads, precision, batches, images_path, labels_path, *models = sys.argv[1:]
if int(threads):
    torch.set_num_threads(int(threads))
torch.set_float32_matmul_precision(precision)
images, labels = read_idx(images_path, 3), read_idx(labels_path, 1).long()
results = {}
with torch.no_grad():
    for model_argument in models:
        path, _, own_batches = model_argument.partition("@")
        sizes = [int(size) or len(images) for size in (own_batches or batches).split(",")]
        if path.endswith(".pt2"):  # float32 [N, 1, 28, 28] in [0, 1]
            model, inputs = torch.export.load(path).module(), images.unsqueeze(1).float() / 255
        else:  # TorchScript takes the uint8 images as the IDX file holds them
            model, inputs = torch.jit.load(path), images
        results[path] = {}
        for batch in sizes:
            logits = torch.cat([model(inputs[i : i + batch]) for i in range(0, len(images), batch)])
            accuracy = (logits.argmax(1) == labels).sum().item() / len(labels)
            results[path][batch] = {"accuracy": accuracy, "sha256": sha256(logits)}
        if not path.endswith(".pt2"):
            first = sizes[0]
            probabilities = torch.cat(
                [model.probabilities(images[i : i + first]) for i in range(0, len(images), first)]
            )
            results[path]["probabilities"] = sha256(probabilities)
print(
    json.dumps(
        {
            "threads": torch.get_num_threads(),
            "precision": torch.get_float32_matmul_precision(),
            "kernels": torch.backends.cpu.get_cpu_capability(),
            "imported": sorted(name for name in sys.modules if name.startswith(("mnist_pipeline", "stages"))),
            "models": results,
        }
    )
)
