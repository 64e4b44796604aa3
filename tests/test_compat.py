"""mmpretrain beside a transformers that lacks what its multimodal models import (seen on the lent H100s): both mm
front ends, the transfers (mmdet imports mmpretrain) and ``dap_pretrain.mm``, switch those models off and run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_transformers")  # transformers 5.0.0 without BLIP's three helpers
REPO = Path(__file__).resolve().parents[1]


def _run(code: str, *, fake: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKE)] * fake + [str(REPO)])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def mm(require):
    require("mmpretrain", "mmdet")


def test_mmdet_models_import_beside_an_incompatible_transformers(mm):
    broken = _run("import mmdet.models")
    assert broken.returncode != 0 and "TypeError" in broken.stderr, broken.stderr[-500:]  # what the guard prevents
    fixed = _run(
        "from dap_pretrain.compat import without_broken_multimodal as guard\n"
        "print(guard())\n"
        "import mmdet.models, mmpretrain.models, sys\n"
        "print(guard(), 'mmpretrain.models' in sys.modules)"
    )
    assert fixed.returncode == 0, fixed.stderr[-1000:]
    first, second = fixed.stdout.strip().splitlines()
    assert first.startswith("mmpretrain's multimodal models switched off: transformers 5.0.0 lacks") and \
        "apply_chunking_to_forward" in first, first  # fmt: skip
    assert second == "None True", second  # imported, and nothing left to switch off


def test_guard_leaves_a_machine_without_transformers_alone(mm):
    res = _run("from dap_pretrain.compat import without_broken_multimodal as g; print(g())", fake=False)
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr[-500:]


def test_the_mmpretrain_front_end_imports_beside_an_incompatible_transformers(mm):
    broken = _run("import mmpretrain.models")
    assert broken.returncode != 0 and "TypeError" in broken.stderr, broken.stderr[-500:]
    res = _run("import dap_pretrain.mm; from mmpretrain.registry import MODELS; print(MODELS.get('DaPClsHead'))")
    assert res.returncode == 0, res.stderr[-1000:]
    assert "DaPClsHead" in res.stdout and "multimodal models switched off" in res.stderr, (res.stdout, res.stderr)
