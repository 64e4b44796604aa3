"""The mm-stack guard for tests/mm: without mmengine/mmcv/mmpretrain these tests skip locally and fail under CI=true.

Session-scoped and autouse, so it runs before the module-scoped training fixtures; test modules import
``dap_pretrain.mm`` inside fixtures and tests, never at module level.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _mm_stack(require):
    require("mmengine", "mmcv", "mmpretrain")
