"""The suite's own bookkeeping in conftest.py names files and tests that exist: a renamed
test would otherwise silently move from `make test-fast`'s exclusions into its loop, and a
renamed file would lose its place at the front of the schedule."""

import ast

import conftest


def _test_names(path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_slow_and_scheduled_names_exist(repo_root):
    tests = repo_root / "tests"
    files = {p.name for p in tests.glob("test_*.py")}
    for listed in (conftest.SLOW_FILES, conftest.SLOW_TESTS, conftest.LONGEST_FIRST):
        assert set(listed) <= files, set(listed) - files
    for name, slow in conftest.SLOW_TESTS.items():
        assert slow <= _test_names(tests / name), (name, slow - _test_names(tests / name))
