# Two commands for a fresh machine: `make repro` and `make test`. Both set up the
# environment first: uv (installed into .tools/ when missing), then .venv from uv.lock.
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
RUN := $(UV) run --frozen

.PHONY: setup repro test lint format fast medium best sweep bench report pr-report figures fingerprint

# Bytecode is compiled once here: every stage starts a fresh interpreter, and containers often
# set PYTHONDONTWRITEBYTECODE, so without it each one compiles torch's and DVC's sources again.
# (Not as a uv setting: then every `uv run` checks all 12,000 files again, 0.6 s a command.)
setup: $(UV) .dvc/tmp/offline-plots.html
	$(UV) sync --frozen --compile-bytecode

# The page template that .dvc/config gives `dvc plots show/diff`: vega inline, so the pages need no network.
.dvc/tmp/offline-plots.html: uv.lock mnist_pipeline/report.py | $(UV)
	$(RUN) python -m mnist_pipeline.report template $@

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv==0.13.8

repro: setup
	$(RUN) dvc repro

# The recipes in recipes/ as named DVC experiments (`uv run dvc exp show` lists them), replacing
# an earlier run of the recipe, if any.
fast medium best: setup
	$(RUN) dvc exp remove --quiet $@ 2>/dev/null || true
	$(RUN) dvc exp run --name $@ $(addprefix -S ,$(shell grep -v '^#' recipes/$@.txt))

# The grid in recipes/sweep.txt (comma-separated values) through DVC's queue, two workers at a time.
sweep: setup
	$(RUN) dvc exp run --queue $(addprefix -S ,$(shell grep -v '^#' recipes/sweep.txt))
	$(RUN) dvc exp run --run-all --jobs 2
	$(RUN) dvc exp show --only-changed

# Every plot (the workspace against HEAD) as an image, with the params, metrics and experiments as markdown.
report: setup
	$(RUN) python -m mnist_pipeline.report report report

# What a pull request's workflow posts (.github/workflows/pr-report.yml): the pipeline reproduced
# at this branch's params, then report/ against BASE (`make pr-report BASE=origin/main`).
BASE ?= main
pr-report: repro
	$(RUN) python -m mnist_pipeline.report report report --base $(BASE)

# The README's pictures (docs/figures/): the committed baseline's curves, and what the best
# recipe's augmentation does to the digits in data/mnist.
figures: setup
	$(RUN) python -m mnist_pipeline.report figures docs/figures

bench: setup
	$(RUN) python benchmarks/bench.py

# Hashes of this machine's arithmetic, to compare with another CPU's (docs/reproducibility.md).
fingerprint: setup
	$(RUN) python -m mnist_pipeline.fingerprint

# Two workers, a module each at a time, in the order tests/conftest.py gives them (xdist would
# otherwise start the modules with the most tests first). On 2 cores a third worker did not make the
# suite faster: its torch processes beside the other two's burn their time in OpenMP's waits.
test: setup lint
	$(RUN) pytest --numprocesses 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(RUN) ruff format --check .
	$(RUN) ruff check .
	$(RUN) actionlint

format: setup
	$(RUN) ruff format .
	$(RUN) ruff check --fix .
