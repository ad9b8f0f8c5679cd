"""The architecture's rules as checks: operators/ is pure inference (no Kafka, no Faust, no streams/),
no two modules import each other in a cycle, and no module of streams/ or operators/ is over 500 lines.

The import rules are import-linter contracts (.importlinter at the repository root); import-linter's
own report names the offending imports when one breaks."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from importlinter.cli import lint_imports

MAX_MODULE_LINES = 500


def assert_contract_kept(contract: str, capsys, monkeypatch) -> None:
    """Fails with import-linter's report unless `contract` (an id in .importlinter) holds."""
    monkeypatch.chdir(REPO)  # import-linter finds the packages from the working directory
    code = lint_imports(config_filenames=(str(REPO / ".importlinter"),), limit_to_contracts=(contract,),
                        no_cache=True, no_logo=True)
    if code != 0:
        pytest.fail(capsys.readouterr().out, pytrace=False)


def test_operators_import_neither_kafka_faust_nor_streams(capsys, monkeypatch):
    assert_contract_kept("operators-pure", capsys, monkeypatch)


def test_no_import_cycle_between_the_modules_of_streams_or_operators(capsys, monkeypatch):
    assert_contract_kept("acyclic", capsys, monkeypatch)


@pytest.mark.parametrize("package", ["streams", "operators"])
def test_no_module_is_over_500_lines(package):
    sizes = {str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
             for path in Path(REPO, package).rglob("*.py")}
    assert sizes  # the package was found
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}
