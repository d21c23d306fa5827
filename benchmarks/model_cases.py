"""The model as it ships (`model`): how fast a user's torch runs models/model.pt, which computes its own
portable arithmetic, against a plain float32 TorchScript export of the same weights."""

import json
import sys

from cells import spread
from scratch import ROOT, Scratch

CASES = ["model"]

# The plain export: the trained weights in torch's own float32 arithmetic, with model.pt's input checks.
PLAIN_EXPORT = """
import torch
from mnist_pipeline.export import DigitClassifier
from mnist_pipeline.model import load_checkpoint
model = load_checkpoint(__import__("pathlib").Path("models/checkpoint.pt")).model
torch.jit.save(torch.jit.script(DigitClassifier(model)), ".bench/plain.pt")
"""


def run_model(scratch: Scratch) -> dict:
    """benchmarks/model_speed.py on models/model.pt and the plain export, in a Python with torch alone."""
    if not (scratch.path / ".bench" / "plain.pt").exists():
        scratch.run(sys.executable, "-W", "ignore", "-c", PLAIN_EXPORT)
    speed = ROOT / "benchmarks" / "model_speed.py"
    images = "data/mnist/t10k-images-idx3-ubyte"
    return json.loads(scratch.run(sys.executable, "-I", str(speed), images, "models/model.pt", ".bench/plain.pt").out)


def render(results: dict[str, list]) -> list[str]:
    """Images/s of each file at batch 1 and 1000 over every round's timings, and the time ratio within each pair."""
    if "model" not in results:
        return []
    rows = [
        "| the exported model, a user's torch (2 threads) | images/s, model.pt | images/s, plain float32 export "
        "| model.pt's time / the plain export's, within each pair |",
        "|---|---:|---:|---:|",
    ]
    for batch in ("1", "1000"):
        shipped = [value for result in results["model"] for value in result[batch]["model.pt"]]
        plain = [value for result in results["model"] for value in result[batch]["plain.pt"]]
        ratios = [p / s for s, p in zip(shipped, plain, strict=True)]
        rows.append(f"| batch {batch} | {spread(shipped, 0)} | {spread(plain, 0)} | {spread(ratios, 2)} |")
    return ["\n".join(rows) + "\n"]
