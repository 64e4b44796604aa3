"""The mm-stack guard for tests/mm: without mmengine/mmcv/mmpretrain these tests skip locally and fail under CI=true.

Session-scoped and autouse, so it runs before the module-scoped training fixtures; test modules import
``dap_pretrain.mm`` inside fixtures and tests, never at module level.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

MM_STACK = ("mmengine", "mmcv", "mmpretrain")


@pytest.fixture(scope="session", autouse=True)
def _mm_stack():
    missing = [m for m in MM_STACK if importlib.util.find_spec(m) is None]
    if missing:
        msg = f"{', '.join(missing)} not installed; run tools/install.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
