"""Benchmarks' bookkeeping (schedule rule, rows, tables, data cache) and the GPU check's ``--dry-run`` in CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import cifar_ablation  # noqa: E402
import common  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10"


def test_compressed_schedule_is_the_paper_at_300_and_scales_exactly_at_30():
    assert common.compressed_schedule(300) == dict(
        epochs=300, warmup=40, interval=10, keep=0.9, reuse=150, milestones=[150, 225]
    )
    assert common.compressed_schedule(30) == dict(
        epochs=30, warmup=4, interval=1, keep=0.9, reuse=15, milestones=[15, 23]
    )
    s = common.compressed_schedule(4)  # toy: W and I stay >= 1, milestones inside the run
    assert s["warmup"] >= 1 and s["interval"] >= 1 and all(1 <= m < 4 for m in s["milestones"])


def test_resolve_setting_uses_the_planner():
    s = cifar_ablation.resolve_setting(30, None)
    assert s["keep"] == 0.9 and abs(s["planned_compute"] - 0.6267) < 1e-3  # the paper's 63% at E'=30
    solved = cifar_ablation.resolve_setting(15, 0.63)
    assert abs(solved["planned_compute"] - 0.63) < 0.005 and solved["keep"] < 0.9


def test_row_flags():
    assert cifar_ablation.row_flags("random", None) == ["--dap-select", "random"]
    assert cifar_ablation.row_flags("fewer_epochs", 0.5) == ["--epochs-scale", "0.500000"]
    assert cifar_ablation.row_flags("fixed_subset", 0.25) == ["--fixed-subset", "0.250000"]


def test_tables_report_mean_std_and_difference_to_dap():
    recs = [
        dict(dataset="cifar10", row=row, seed=s, top1=top1 + s, compute_fraction_measured=c, wall_time_s=10.0)
        for row, top1, c in (("all", 90.0, 1.0), ("dap", 89.0, 0.63))
        for s in (0, 2)
    ]
    recs.append(dict(dataset="cifar10", row="random", seed=0, top1=89.5, compute_fraction_measured=0.63,
                     wall_time_s=10.0))
    lines = cifar_ablation.table(recs)
    assert any(line.startswith("| all data (100%) | 2 | 91.00 ± 1.41 | +1.00 | +1.00 ± 0.00 (0/2) | 100.0%")
               for line in lines)
    assert any(line.startswith("| DaP (hard) | 2 | 90.00 ± 1.41 |  |  | 63.0%") for line in lines)
    # paired by seed: random ran seed 0 only, where DaP had 89.0
    assert any(line.startswith("| random drop | 1 | 89.50 ± 0.00 | -0.50 | +0.50 ± 0.00 (0/1) |") for line in lines)
    assert "| cifar10 | 2 | 91.00 ± 1.41 | 90.00 ± 1.41 | -1.00 | 63.0% |" in cifar_ablation.table4(recs)


def test_cifar_folder_keeps_the_first_k_per_class_by_name(tmp_path):
    root = common.cifar_folder(CIFAR, tmp_path, train_per_class=3, test_per_class=2)
    for split, k in (("train", 3), ("test", 2)):
        classes = sorted(p for p in (root / split).iterdir())
        assert len(classes) == 10
        for c in classes:
            names = sorted(p.name for p in c.iterdir())
            assert len(names) == k
            extracted = common.find_dir(None, [tmp_path / "extracted"]).glob(f"*/{split}/{c.name}")
            assert names == sorted(p.name for p in next(extracted).iterdir())[:k]
    assert common.cifar_folder(CIFAR, tmp_path, train_per_class=3, test_per_class=2) == root  # built once


def test_missing_data_is_one_line_error(tmp_path):
    with pytest.raises(common.BenchmarkError, match="pass --data DIR"):
        common.find_dir(str(tmp_path / "nope"), (), ("cifar10_train_jpg.tar.gz",))


def test_finished_run_is_reused_only_with_the_same_flags(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"top1": 50.0}))
    (out / "flags.json").write_text(json.dumps(["--epochs", "4"]))
    assert common.run_trainer(out, ["--epochs", "4"], echo=False) == {"top1": 50.0}
    # other flags: the run is started again (here with a flag the trainer refuses, so it fails fast)
    with pytest.raises(common.BenchmarkError, match="exited 2"):
        common.run_trainer(out, ["--epochs", "4", "--no-such-flag"], echo=False)
    assert not (out / "run.json").exists()
    assert json.loads((out / "flags.json").read_text()) == ["--epochs", "4", "--no-such-flag"]


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
    assert rows == set(cifar_ablation.ROWS), results.get("cifar", {}).get("error")


def test_gpu_decode_wall_fraction_and_original_folder(tmp_path):
    import gpu_decode

    run = tmp_path / "run"
    run.mkdir()
    rows = [(16000, 6.0), (16000, 4.0), (8000, 2.5), (4000, 1.5)]  # epoch 1 pays start-up; epoch 2 is the reference
    (run / "summary.csv").write_text(
        "epoch,samples_trained,epoch_time_s,img_per_s\n"
        + "".join(f"{i + 1},{n},{t},{n / t}\n" for i, (n, t) in enumerate(rows))
    )
    (run / "run.json").write_text(json.dumps({"compute_fraction_measured": 0.6875}))
    res = gpu_decode.wall_vs_compute(run)
    assert res["compute_fraction"] == 0.6875
    assert res["wall_fraction"] == pytest.approx((4.0 + 4.0 + 2.5 + 1.5) / (4 * 4.0))
    src = REPO.parent / "shared" / "data" / "imagenet_sample"
    root = gpu_decode.original_folder(src, tmp_path, copies=2, max_classes=3)
    assert len(list(root.glob("train/*/*"))) == 6 and len(list(root.glob("val/*/*"))) == 3
