"""The experiment loop as a user runs it, in a copy of the project on synthetic data: every DVC
workspace (main, --temp, queue) runs its own code, the run-cache answers known params, and
results travel through an S3 remote (moto's server on loopback).

Commands run through `run`, which only activates the environment, as `source .venv/bin/activate`
does: the copy's stages must import the copy's package, not the checkout the environment was
installed from.
"""

import ast
import json
import os
import re
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import PROJECT, copy_project, run, set_params, stage_command
from moto.server import ThreadedMotoServer


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, synthetic_mirror):
    """A committed copy after `dvc repro` (2 epochs), with MNIST_MIRROR relative to it, as in CI."""
    directory, checksums = synthetic_mirror
    project = copy_project(tmp_path_factory.mktemp("experiments"), checksums)
    set_params(project, epochs=2)
    mirror = os.path.relpath(directory, project)
    assert mirror.startswith("..")
    run(project, "dvc", "repro", mirror=mirror)
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "baseline")
    yield project, mirror
    run(project, "dvc", "queue", "stop", check=False)  # workers also stop by themselves when idle


def test_commands_get_no_pythonpath_from_the_test_run(monkeypatch, tmp_path):
    """A PYTHONPATH in the shell that started the tests would let a copy's stages import another
    checkout's package, which no user's dvc does: the commands run without it."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    shown = run(tmp_path, "python", "-c", "import os, sys; print(os.environ.get('PYTHONPATH'), str(sys.path))")
    seen, path = shown.stdout.split(" ", 1)
    assert seen == "None" and str(tmp_path) not in path


def clean(project: Path) -> bool:
    """Whether git and DVC both see the workspace as committed."""
    git = run(project, "git", "status", "--porcelain").stdout
    dvc = run(project, "dvc", "status").stdout
    return git == "" and "Data and pipelines are up to date." in dvc


def project_files_imported(module: str) -> set[str]:
    """The project's source files that running `module` may import: its own and, one after another, those
    that their import statements name, wherever these stand (in a function, or a branch this machine
    never takes), with the packages' __init__.py that Python imports first."""
    files: set[str] = set()
    pending = [module]
    while pending:
        parts = pending.pop().split(".")
        for end in range(1, len(parts) + 1):
            path = Path(*parts[:end])
            found = next((c for c in (path.with_suffix(".py"), path / "__init__.py") if (PROJECT / c).is_file()), None)
            if found is None or found.as_posix() in files:
                continue
            files.add(found.as_posix())
            for node in ast.walk(ast.parse((PROJECT / found).read_text())):
                if isinstance(node, ast.Import):
                    pending += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    pending += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return files


def test_every_project_module_a_stage_imports_is_among_its_deps():
    """DVC reruns a stage when a file among its deps changes: each project module its command may
    import must be there, and nothing else, or a change reruns stages it cannot affect."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["download", "train", "evaluate", "export"]
    for name, stage in stages.items():
        assert stage_command(PROJECT, name)[1:3] == ["-m", f"stages.{name}"]
        imported = project_files_imported(f"stages.{name}")
        assert {"mnist_pipeline/__init__.py", "mnist_pipeline/stage.py", f"stages/{name}.py"} <= imported
        deps = {dep for dep in stage["deps"] if dep.endswith(".py")}
        assert imported == deps, (
            f"{name}: imports {sorted(imported - deps)}, needlessly depends on {sorted(deps - imported)}"
        )


def test_each_stage_command_names_exactly_the_files_its_stage_declares():
    for name, stage in yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].items():
        named = {argument for argument in stage_command(PROJECT, name)[3:] if not argument.startswith("--")}
        outputs = {
            next(iter(out)) if isinstance(out, dict) else out
            for key in ("outs", "metrics", "plots")
            for out in stage.get(key, [])
        }
        data = {dep for dep in stage["deps"] if not dep.endswith(".py")}
        declared = data | outputs | ({"params.yaml"} if "params" in stage else set())
        # A named folder stands for the declared files under it (DVCLive's, for the train stage).
        assert all(path in named or any(path.startswith(f"{n}/") for n in named) for path in declared), name
        assert all(n in declared or any(path.startswith(f"{n}/") for path in outputs) for n in named), name


def test_a_queued_experiment_runs_the_code_it_was_queued_with_and_finds_a_relative_mirror(baseline):
    project, mirror = baseline
    modules = [project / "mnist_pipeline" / name for name in ("download.py", "training.py")]
    committed = [module.read_text() for module in modules]
    for module, text in zip(modules, committed, strict=True):
        module.write_text(text + f'print("MARKER: queued {module.name}")\n')
    run(project, "dvc", "exp", "run", "--queue", "-S", "train.epochs=1", "-S", "augment.rotation=10", "-n", "queued")
    for module, text in zip(modules, committed, strict=True):
        module.write_text(text)  # the queued experiment must still run the edited files
    run(project, "dvc", "queue", "start", mirror=mirror)  # workers inherit this environment
    logs = run(project, "dvc", "queue", "logs", "--follow", "queued").stdout  # returns when it ends
    assert "MARKER: queued download.py" in logs
    assert "MARKER: queued training.py" in logs
    assert "train-images-idx3-ubyte: verified, from file://" in logs  # the mirror, not the internet
    assert re.search(r"queued\s.*Success", run(project, "dvc", "queue", "status").stdout)
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    [queued] = [e for entry in shown for e in entry.get("experiments") or [] if e.get("name") == "queued"]
    params = queued["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert (params["train"]["epochs"], params["augment"]["rotation"]) == (1, 10)
    assert clean(project)


def test_a_temp_experiment_runs_its_own_code_and_finds_a_relative_mirror(baseline):
    project, mirror = baseline
    download = project / "mnist_pipeline" / "download.py"
    committed = download.read_text()
    download.write_text(committed + 'print("MARKER: temp code")\n')
    try:
        # The changed module reruns download inside .dvc/tmp/exps/, where a mirror path relative
        # to the project root only resolves through DVC_ROOT.
        result = run(project, "dvc", "exp", "run", "--temp", "-S", "train.epochs=1", "-n", "temp", mirror=mirror)
    finally:
        download.write_text(committed)
    assert "MARKER: temp code" in result.stdout
    assert "train-images-idx3-ubyte: verified, from file://" in result.stdout
    assert clean(project)


# Params of an experiment: 3 epochs, digits turned and deformed. The run-cache test runs it first, and the
# S3 test then shares it, restored from the run-cache (as run anew when that test runs alone).
DEFORMED_RUN = ("-S", "train.epochs=3", "-S", "augment.rotation=15", "-S", "augment.elastic_alpha=8")
DEFORMED_RUN += ("-S", "augment.elastic_sigma=3")


def test_known_params_are_restored_from_the_run_cache_without_running(baseline):
    project, _ = baseline
    outputs = ["models/checkpoint.pt", "models/model.pt", "models/model.pt2", "metrics/eval.json"]
    outputs.append("metrics/augmented.gif")
    committed = {path: (project / path).read_bytes() for path in outputs}
    result = run(project, "dvc", "exp", "run", *DEFORMED_RUN)
    assert result.stdout.count("Running stage") == 3
    changed = {path: (project / path).read_bytes() for path in outputs}
    assert changed["models/checkpoint.pt"] != committed["models/checkpoint.pt"]
    assert changed["metrics/augmented.gif"] != committed["metrics/augmented.gif"]

    run(project, "git", "checkout", "HEAD", "--", ".")
    result = run(project, "dvc", "repro")
    assert "Running stage" not in result.stdout
    assert "Stage 'train' is cached - skipping run" in result.stdout
    assert "Stage 'export' is cached - skipping run" in result.stdout
    assert {path: (project / path).read_bytes() for path in outputs} == committed
    assert clean(project)

    result = run(project, "dvc", "exp", "run", *DEFORMED_RUN)  # an experiment that ran before
    assert "Running stage" not in result.stdout
    for stage in ("train", "evaluate", "export"):
        assert f"Stage '{stage}' is cached - skipping run" in result.stdout
    assert {path: (project / path).read_bytes() for path in outputs} == changed
    run(project, "git", "checkout", "HEAD", "--", ".")
    run(project, "dvc", "checkout")
    assert clean(project)


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback, with an empty bucket `mnist`."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket="mnist")
    yield endpoint
    server.stop()


def add_credentials(project: Path) -> None:
    """Credentials only in the clone's untracked .dvc/config.local, as docs/experiments.md advises."""
    run(project, "dvc", "remote", "modify", "--local", "storage", "access_key_id", "test-key")
    run(project, "dvc", "remote", "modify", "--local", "storage", "secret_access_key", "test-secret")


def test_results_travel_through_an_s3_remote(baseline, s3_endpoint, tmp_path):
    project, _ = baseline
    run(project, "dvc", "remote", "add", "-d", "storage", "s3://mnist/store")
    run(project, "dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint)
    run(project, "git", "commit", "-qam", "Store data and models in S3")  # committed before any experiment
    add_credentials(project)
    run(project, "git", "check-ignore", "-q", ".dvc/config.local")  # fails unless git ignores it
    assert "test-secret" not in (project / ".dvc" / "config").read_text()
    run(project, "dvc", "push")
    origin = tmp_path / "origin.git"
    run(project, "git", "init", "-q", "--bare", str(origin))
    run(project, "git", "push", "-q", str(origin), "HEAD:refs/heads/main")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", "--branch", "main", str(origin), str(clone))
    add_credentials(clone)
    run(clone, "dvc", "pull")
    result = run(clone, "dvc", "repro")
    assert "Running stage" not in result.stdout
    assert clean(clone)
    for path in ("data/mnist/train-images-idx3-ubyte", "models/checkpoint.pt", "models/model.pt"):
        assert (clone / path).read_bytes() == (project / path).read_bytes()

    run(project, "dvc", "exp", "run", *DEFORMED_RUN, "-n", "shared")
    shared = (project / "models" / "model.pt").read_bytes()
    run(project, "dvc", "exp", "push", str(origin), "shared")
    run(clone, "dvc", "exp", "pull", str(origin), "shared")
    shown = json.loads(run(clone, "dvc", "exp", "show", "--json").stdout)
    assert "shared" in json.dumps(shown)
    assert (clone / "models" / "model.pt").read_bytes() != shared  # the baseline's, until the experiment is applied
    run(clone, "dvc", "exp", "apply", "shared")
    assert (clone / "models" / "model.pt").read_bytes() == shared
    assert yaml.safe_load((clone / "params.yaml").read_text())["train"]["epochs"] == 3
