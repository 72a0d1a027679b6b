"""The test order `make test` relies on: the longest files first, each file's tests together."""

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import LONG_FILES, pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parent.parent


def test_every_long_file_exists():
    missing = [f for f in LONG_FILES if not (ROOT / f).is_file()]
    assert not missing, f"LONG_FILES names files that do not exist (moved or deleted?): {missing}"


def test_longest_files_first_then_collection_order_with_each_file_together():
    longest, second = sorted(LONG_FILES, key=lambda f: -LONG_FILES[f])[:2]
    files = ["tests/a/test_x.py", second, "tests/a/test_y.py", longest]
    items = [SimpleNamespace(path=ROOT / f, name=f"{f}::{k}") for f in files for k in range(2)]
    pytest_collection_modifyitems(SimpleNamespace(rootpath=ROOT), items)
    order = [i.name for i in items]
    assert order == [f"{f}::{k}" for f in (longest, second, "tests/a/test_x.py", "tests/a/test_y.py") for k in range(2)]
