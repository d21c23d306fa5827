"""The pipeline's stages, run by DVC as `python -m stages.<name>` (see dvc.yaml).

Before a stage imports anything, check that this Python has the project's packages (a `dvc`
installed elsewhere runs the stages with its own Python, which would fail on `import torch`),
and make the numeric settings that must precede torch (see mnist_pipeline/numerics.py).
"""

import importlib.util
import sys

from mnist_pipeline.numerics import pin_kernels

pin_kernels()

_missing = [name for name in ("torch", "numpy", "yaml", "tqdm") if importlib.util.find_spec(name) is None]
if _missing:
    sys.exit(
        f"error: {sys.executable} lacks the project's packages ({', '.join(_missing)}): "
        "run the pipeline in the project's environment, with `uv run dvc repro` or `make repro`"
    )
