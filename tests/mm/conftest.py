"""The mm-stack guard for tests/mm: without mmengine/mmcv/mmpretrain these tests skip locally and fail under CI=true.

Session-scoped and autouse, so it runs before the module-scoped training fixtures; test modules import
``dap_pretrain.mm`` inside fixtures and tests, never at module level.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _mm_stack(require):
    require("mmengine", "mmcv", "mmpretrain")


@pytest.fixture(autouse=True)
def _mmpretrain_scope(_mm_stack):
    """Each test builds mmpretrain modules (``type='CrossEntropyLoss'``) in mmpretrain's scope, as its runner would.

    mmengine's default scope is process-global: a downstream test run earlier in the same process leaves it at
    ``mmpose``, whose registry has no ``CrossEntropyLoss`` (seen under ``pytest -n 2``, where files share workers).
    """
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmpretrain"):
        yield
