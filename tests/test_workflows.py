"""The GitHub workflows (.github/): what they run is what a user runs, through the Makefile.

actionlint (in `make lint`) checks their syntax and expressions; the workflows themselves run
only on a Git host. Their report target, `make pr-report`, is tested in test_pipeline.py.
"""

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT

WORKFLOW_FILES = sorted(
    [*(PROJECT / ".github").glob("workflows/*.yml"), *(PROJECT / ".github").glob("actions/*/*.yml")]
)


def run_scripts(node: object) -> Iterator[str]:
    """Every `run:` script in a workflow or action file, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "run" and isinstance(value, str):
                yield value
            else:
                yield from run_scripts(value)
    elif isinstance(node, list):
        for item in node:
            yield from run_scripts(item)


def make_targets(script: str) -> list[str]:
    return re.findall(r"(?<![\w-])make\s+([A-Za-z][\w-]*)", script)


def has_rule(target: str) -> bool:
    """Whether the Makefile can make `target` (a dry run: nothing is executed)."""
    return subprocess.run(["make", "--dry-run", target], cwd=PROJECT, capture_output=True).returncode == 0


def test_the_workflows_run_make_targets_that_exist():
    called = {
        target
        for path in WORKFLOW_FILES
        for script in run_scripts(yaml.safe_load(path.read_text()))
        for target in make_targets(script)
    }
    assert {"test", "pr-report"} <= called  # the two workflows' reasons to be
    assert [target for target in sorted(called) if not has_rule(target)] == []


def test_a_target_the_makefile_lacks_is_caught():
    """The negative control of the test above."""
    assert make_targets('make pr-report BASE="origin/main"\nmake  no-such-target') == ["pr-report", "no-such-target"]
    assert not has_rule("no-such-target")


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: str(path.relative_to(PROJECT)))
def test_each_workflow_runs_in_the_project_root_with_no_step_of_its_own_beyond_set_up(path: Path):
    """Steps that do the project's work call the Makefile; the rest only set up or post."""
    for script in run_scripts(yaml.safe_load(path.read_text())):
        first = script.strip().split()[0]
        assert first in ("make", "mkdir", "echo", "cml"), f"{path.name}: a step runs {first!r}, not a Makefile target"
