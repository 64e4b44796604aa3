"""tests/conftest.py's LONGEST_FIRST names real test files: a renamed file would silently lose its early start."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_longest_first_names_existing_test_files():
    spec = importlib.util.spec_from_file_location("tests_root_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)  # by path: tests/mm has a conftest module of its own
    spec.loader.exec_module(conftest)
    LONGEST_FIRST = conftest.LONGEST_FIRST  # noqa: N806
    missing = [name for name in LONGEST_FIRST if not (REPO / name).is_file()]
    assert not missing, f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert all(Path(name).name.startswith("test_") for name in LONGEST_FIRST)
