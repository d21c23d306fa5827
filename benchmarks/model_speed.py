"""How fast a user's torch runs the exported model: make bench's `model` case runs this, with torch alone
(no code of the project), as a user of the file would.

Times each TorchScript file given on the MNIST test images at batch 1 and at batch 1000, the files in
turn, ROUNDS times, the first file first in odd rounds and last in even ones, each timing a second's
worth of calls; prints a JSON object: for each batch size, each file's images/s in every round.

    python benchmarks/model_speed.py data/mnist/t10k-images-idx3-ubyte models/model.pt plain.pt
"""

import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROUNDS = 7
BATCHES = (1, 1000)
SECONDS = 1.0

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load's deprecation
images_path, *paths = sys.argv[1:]
content = Path(images_path).read_bytes()
images = torch.frombuffer(bytearray(content[16:]), dtype=torch.uint8).view(-1, 28, 28)  # IDX: 16-byte header
models = {path: torch.jit.load(path) for path in paths}


def images_per_second(model: torch.jit.ScriptModule, batch: int) -> float:
    """Calls on successive batches of the test images for SECONDS, as images per second."""
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < SECONDS:
        first = calls * batch % (len(images) - batch + 1)
        model(images[first : first + batch])
        calls += 1
    return calls * batch / elapsed


speeds: dict[int, dict[str, list[float]]] = {batch: {path: [] for path in paths} for batch in BATCHES}
with torch.no_grad():
    for batch in BATCHES:
        for model in models.values():  # warm-up: TorchScript profiles and optimizes its first calls
            for _ in range(20):
                model(images[:batch])
        for round_number in range(ROUNDS):
            for path in paths if round_number % 2 == 0 else paths[::-1]:
                speeds[batch][path].append(images_per_second(models[path], batch))
print(
    json.dumps(
        {batch: {Path(path).name: values for path, values in by_file.items()} for batch, by_file in speeds.items()}
    )
)
