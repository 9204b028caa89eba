"""Every script under bench/ with a command line builds its parser in ``build_parser()``, and its
``main`` parses with that parser (what the documentation's commands are checked against)."""

import argparse
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def has_command_line(path: Path) -> bool:
    """Whether the file ends in ``if __name__ == "__main__":`` (a script, not only a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__" for node in tree.body)


SCRIPTS = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts)
                 for path in (ROOT / "bench").rglob("*.py") if "studies" not in path.parts and has_command_line(path))


def test_the_scripts_are_found():
    assert {"bench.e2e", "bench.engine_host", "bench.device_report", "bench.lab.study", "bench.lab.horizon_study",
            "bench.lab.adaptive", "bench.lab.score_completions"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_parses_with_build_parser(name, capsys):
    module = importlib.import_module(name)
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == parser.format_help()
