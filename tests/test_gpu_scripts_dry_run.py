"""The GPU scripts' CPU rehearsals in CI (benchmarks/gpu_check.sh, gpu_decode_ab.sh, gpu_transfer.sh): each runs its
whole script at toy size. A file of their own, so that the test workers can run them beside the other files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

CIFAR = REPO.parent / "shared" / "data" / "cifar10"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU script's code paths on the CPU at toy size: engine speed, CIFAR rows, summary last, JSON."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(
        [
            "bash",
            "benchmarks/gpu_check.sh",
            "--dry-run",
            "--work-dir",
            str(tmp_path / "work"),
            "--data",
            str(CIFAR),
            "--imagenet",
            str(REPO.parent / "shared/data/imagenet_sample"),
            "--cifar-rows",  # the sweep's code is the same for every row; paper_tables' dry run trains all six
            "all",
            "dap",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("total ")
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["engine"]["trainer_none"]["img_per_s"] > 0 and results["engine"]["bare_loop"]["img_per_s"] > 0
    rows = {r["row"] for r in results["cifar"]["runs"]}
    assert rows == {"all", "dap"}, results.get("cifar", {}).get("error")


@pytest.mark.slow
def test_gpu_decode_ab_dry_run(tmp_path):
    """The prepared GPU job for the pipeline's experiments, on the CPU at toy size: tests, then every variant."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DRY_RUN": "1", "WORK_DIR": str(tmp_path / "w"),
           "IMAGENET": str(REPO.parent / "shared/data/imagenet_sample"),
           # the script's test step, with a file that imports no torch (1 s): the suite runs the GPU job's two
           # test files itself (tests/data/test_gpu_decode.py, tests/test_mixing.py)
           "TESTS": "tests/test_suite_order.py",
           "STEPS": "model_only_torch_defaults model_only model_gpu_loader_same_priority model_gpu_loader_half_fused "
                    "model_gpu_loader_pinned_nested_half_whole trainer_cpu_decode profile_trainer_cpu_decode "
                    "model_gpu_loader_same_priority profile_model_gpu_loader"}  # fmt: skip
    proc = subprocess.run(["bash", "benchmarks/gpu_decode_ab.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "tests (tests/test_suite_order.py): exit 0" in summary and " passed" in summary, summary
    steps = json.loads((out / "gpu_decode.json").read_text())["steps"]
    base = "model_gpu_loader_same_priority"
    assert {base, f"{base} (2)", "model_gpu_loader_pinned_nested_half_whole"} <= set(steps), steps  # both baselines
    assert steps["model_gpu_loader_pinned_nested_half_whole"]["chunk"] is False  # one worker per batch
    profile, trainer = steps.pop("profile_model_gpu_loader"), steps.pop("profile_trainer_cpu_decode")
    assert trainer["trainer"]["steps"] == 1 and trainer["trainer"]["wall_ms"] > 0, trainer  # the trainer's step
    assert all(res["img_per_s"] > 0 for res in steps.values()), steps
    assert steps["model_gpu_loader_half_fused"]["dtype"] == "torch.bfloat16"  # the dry run's AMP dtype
    assert steps["model_gpu_loader_half_fused"]["fuse"] is True
    assert steps["model_gpu_loader_half_fused"]["fused"] is True  # compiled, not fallen back
    cpu = steps["trainer_cpu_decode"]  # per epoch, its wait for the first batch; the rate without it is higher
    assert all(s > 0 for s in cpu["first_batch_s"]) and cpu["after_first_batch_img_per_s"] > cpu["img_per_s"], cpu
    assert profile["model_only"]["wall_ms"] > 0 and profile["fed"]["wall_ms"] > 0, profile  # no CUDA events on CPU


@pytest.mark.slow
def test_gpu_transfer_dry_run(tmp_path, require):
    """benchmarks/gpu_transfer.sh on the CPU: every step, 2 iterations, small inputs; --gpus 1 refused. Mask R-CNN
    is left out (TASKS): it runs through the same lines of the script as Faster R-CNN, and test_transfer.py runs
    it through tools/transfer_coco.sh (this rehearsal took 80-117 s with it)."""
    require("mmcv", "mmdet", "mmpose")
    env = {**os.environ, "DRY_RUN": "1", "DAP_PYTHON": sys.executable, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "TASKS": "faster_rcnn simplebaseline"}  # fmt: skip
    for var in ("WHEELS", "ITERS", "BUDGET_S", "DATA_ROOT"):
        env.pop(var, None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_transfer.sh", "--data-root", str(REPO.parent / "shared/data/coco_mini")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("faster_rcnn", "simplebaseline"):
        assert f"{name}: {name} plain x1 | " in summary and summary.count("| cpu | wall") == 2
        assert json.loads((tmp_path / f"{name}.metrics.json").read_text())["run"]["train_iters"] == 2
    assert "mask_rcnn: " not in summary.replace("Mask R-CNN", "")
    assert "but torch sees 0 CUDA device(s); drop --gpus" in summary and "| exit 2" in summary
    assert "Table 8 FPN ResNet-50: " in summary and "Table 8 Mask R-CNN ResNet-50: not measured" in summary
    assert "gpu_transfer done in" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["summary.txt", "log.txt", "faster_rcnn.metrics.json", "simplebaseline.metrics.json"]
    )
