"""The architecture's rules as checks: operators/ is pure inference (no Kafka, no Faust, no streams/),
no two modules import each other in a cycle, and no module of streams/ or operators/ is over 500 lines.

The import rules are import-linter contracts (.importlinter at the repository root); import-linter's
own report names the offending imports when one breaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

MAX_MODULE_LINES = 500


def assert_contract_kept(contract: str) -> None:
    """Fails with import-linter's report unless `contract` (an id in .importlinter) holds. Run as its own
    process: in-process, import-linter reconfigures logging for the rest of the test session."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), str(REPO / ".importlinter"), "--contract", contract, "--no-cache"],
                            cwd=REPO, capture_output=True, text=True)  # it finds the packages from the working directory
    if result.returncode != 0:
        pytest.fail(result.stdout + result.stderr, pytrace=False)


def test_operators_import_neither_kafka_faust_nor_streams():
    assert_contract_kept("operators-pure")


def test_no_import_cycle_between_the_modules_of_streams_or_operators():
    assert_contract_kept("acyclic")


@pytest.mark.parametrize("package", ["streams", "operators"])
def test_no_module_is_over_500_lines(package):
    sizes = {str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
             for path in Path(REPO, package).rglob("*.py")}
    assert sizes  # the package was found
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
