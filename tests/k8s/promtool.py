"""Run ``promtool check rules`` and ``promtool test rules`` on k8s/monitoring.

The PrometheusRule's ``spec`` is a plain Prometheus rule file. It is written out as
``saescope-rules.yaml`` into a work folder beside copies of the unit tests
(k8s/monitoring/tests/*.yaml, which name that file in ``rule_files``), and promtool runs there.

From the repository root, ``python -m tests.k8s.promtool`` runs both and prints promtool's output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .paths import RULE_TESTS_DIR, RULES_FILE

RULE_FILE_NAME = "saescope-rules.yaml"


@dataclass(frozen=True)
class PromtoolRun:
    """One promtool invocation: its arguments, exit code and combined output."""

    args: list[str]
    returncode: int
    output: str


def rule_groups() -> dict[str, Any]:
    """The PrometheusRule's spec: ``{"groups": [...]}``, a Prometheus rule file's content."""
    manifest = yaml.safe_load(RULES_FILE.read_text())
    spec: dict[str, Any] = manifest["spec"]
    return spec


def rule_test_files() -> list[Path]:
    """The promtool unit-test files, sorted."""
    return sorted(RULE_TESTS_DIR.glob("*.yaml"))


def prepare_workdir(workdir: Path) -> tuple[Path, list[Path]]:
    """Write the rule file and copy the unit tests into ``workdir``; return their paths there."""
    rule_file = workdir / RULE_FILE_NAME
    rule_file.write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    tests = []
    for source in rule_test_files():
        target = workdir / source.name
        shutil.copyfile(source, target)
        tests.append(target)
    return rule_file, tests


def run(promtool: str, args: list[str], cwd: Path) -> PromtoolRun:
    """Run promtool with ``args`` in ``cwd``."""
    done = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    return PromtoolRun([promtool, *args], done.returncode, done.stdout + done.stderr)


def check_rules(promtool: str, workdir: Path, rule_file: Path) -> PromtoolRun:
    """``promtool check rules``: syntax, PromQL parsing, duplicate and naming checks."""
    return run(promtool, ["check", "rules", rule_file.name], workdir)


def run_unit_tests(promtool: str, workdir: Path, tests: list[Path]) -> PromtoolRun:
    """``promtool test rules``: the alert and recording-rule unit tests."""
    return run(promtool, ["test", "rules", *(t.name for t in tests)], workdir)


def main() -> int:
    """Run both checks, print promtool's output, and return non-zero if either fails."""
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found; install Debian's `prometheus` package", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rule_file, tests = prepare_workdir(workdir)
        status = 0
        for result in (
            check_rules(promtool, workdir, rule_file),
            run_unit_tests(promtool, workdir, tests),
        ):
            print("$", " ".join(result.args[1:]))
            print(result.output)
            status = status or result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
