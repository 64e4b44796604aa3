"""Benchmarks' bookkeeping (schedule rule, rows, tables, data cache, the transfer job's GPU-hours estimate) and
the GPU scripts' dry runs in CI."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import cifar_ablation  # noqa: E402
import common  # noqa: E402
import gpu_transfer  # noqa: E402

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
    recs.append(
        dict(dataset="cifar10", row="random", seed=0, top1=89.5, compute_fraction_measured=0.63, wall_time_s=10.0)
    )
    lines = cifar_ablation.table(recs)
    assert any(
        line.startswith("| all data (100%) | 2 | 91.00 ± 1.41 | +1.00 | +1.00 ± 0.00 (0/2) | 100.0%") for line in lines
    )
    assert any(line.startswith("| DaP (hard) | 2 | 90.00 ± 1.41 |  |  | 63.0%") for line in lines)
    # paired by seed: random ran seed 0 only, where DaP had 89.0
    assert any(line.startswith("| random drop | 1 | 89.50 ± 0.00 | -0.50 | +0.50 ± 0.00 (0/1) |") for line in lines)
    assert "| cifar10 | 2 | 91.00 ± 1.41 | 90.00 ± 1.41 | -1.00 | 63.0% |" in cifar_ablation.table4(recs)


def test_cifar_folder_keeps_the_first_k_per_class_by_name(tmp_path):
    root = common.cifar_folder(CIFAR, tmp_path, train_per_class=3, test_per_class=2)
    for split, k in (("train", 3), ("test", 2)):
        with tarfile.open(CIFAR / common.CIFAR_TARBALLS[split]) as tar:
            listed = [m for m in tar.getmembers() if m.isfile()]
            classes = sorted(p for p in (root / split).iterdir())
            assert [c.name for c in classes] == sorted({Path(m.name).parent.name for m in listed})
            for c in classes:
                names = sorted(p.name for p in c.iterdir())
                assert names == sorted(Path(m.name).name for m in listed if Path(m.name).parent.name == c.name)[:k]
                member = next(m for m in listed if m.name.endswith(f"/{c.name}/{names[0]}"))
                assert (c / names[0]).read_bytes() == tar.extractfile(member).read()
    assert not (tmp_path / "extracted").exists()  # read from the tarballs, nothing extracted
    assert common.cifar_folder(CIFAR, tmp_path, train_per_class=3, test_per_class=2) == root  # built once


def _tar(path: Path, entries) -> Path:
    """A .tar.gz of ``entries`` (a dict or a list of pairs, in archive order): name -> bytes (a file), None (a
    folder) or ``"->target"`` (a symbolic link)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items() if isinstance(entries, dict) else entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "layout, readable",
    [
        ({"./": None, "./train/": None, "./train/cat/b.jpg": b"b", "./train/cat/a.jpg": b"a",
          "./train/dog/c.jpg": b"c", "./train/cat/c.jpg": b"c2", "./train/eel/": None}, True),
        ({"cat/b.jpg": b"b", "cat/a.jpg": b"a", "dog/z.jpg": b"z"}, True),
        ({"train/cat/a.jpg": b"a", "train/cat/b.jpg": b"b", "train/dog/c.jpg": "->../cat/a.jpg"}, False),
        ({"train/cat/a.jpg": b"a", "train/cat/deeper/": None, "train/dog/c.jpg": b"c"}, False),
        ({"train/cat/a.jpg": b"a", "test/dog/c.jpg": b"c"}, False),
        ([("train/cat/a.jpg", b"old"), ("train/cat/b.jpg", b"b"), ("./train/cat/a.jpg", b"new"),
          ("train/cat/c.jpg", b"c")], True),  # a name twice (tar -r): the later bytes, counted once
        ({".hidden/cat/a.jpg": b"a", ".hidden/dog/b.jpg": b"b"}, False),
        ({"cat/a.jpg": b"a", "train/b.jpg": b"b"}, False),  # a class named like the split
    ],
    ids=["dot-prefixed-with-an-empty-class", "no-top-folder", "a-link", "a-folder-in-a-class", "two-top-folders",
         "a-name-twice", "a-hidden-top-folder", "a-class-named-train"],
)  # fmt: skip
def test_cifar_folder_from_the_archive_equals_linking_the_extracted_tree(tmp_path, layout, readable):
    """The archive-only read picks what extracting then linking picks, or declines (then cifar_folder extracts)."""
    from dap_pretrain.data.dataset import resolve_data_dir

    archive = _tar(tmp_path / "train.tar.gz", layout)
    fast = tmp_path / "fast"
    read = common._first_k_from_archive(archive, fast, per_class=2, split="train")
    assert read == readable
    if not read:
        assert not fast.exists()  # declined before writing anything
        return
    root = resolve_data_dir(archive, cache_dir=tmp_path / "extracted")
    slow = tmp_path / "slow"
    common._link_split(root / "train" if (root / "train").is_dir() else root, slow, 2)

    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}

    assert tree(fast) == tree(slow) and tree(fast)


def test_a_corrupt_tarball_is_the_extractions_one_line_error(tmp_path):
    """The archive-only read declines an archive it cannot read, so the extraction's DataError names the fix."""
    from dap_pretrain.data.dataset import DataError

    data = tmp_path / "cifar10"
    data.mkdir()
    good = _tar(tmp_path / "good.tar.gz", {"test/cat/a.jpg": b"a" * 4000})
    (data / common.CIFAR_TARBALLS["train"]).write_bytes(good.read_bytes()[:-200])  # truncated
    (data / common.CIFAR_TARBALLS["test"]).write_bytes(good.read_bytes())
    assert not common._first_k_from_archive(data / common.CIFAR_TARBALLS["train"], tmp_path / "x", 1, split="train")
    with pytest.raises(DataError, match="is corrupt or not a tar file"):
        common.cifar_folder(data, tmp_path / "work", train_per_class=1, test_per_class=1)
    assert not any(p.name.startswith(".cifar10-") for p in (tmp_path / "work").iterdir())  # nothing half-built


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


def test_gpu_decode_step_names_pick_the_loader_experiments():
    import gpu_decode
    from common import BenchmarkError

    assert gpu_decode.loader_variant("model_gpu_loader") == {"priority": True}
    assert gpu_decode.loader_variant("model_gpu_loader_same_priority") == {"priority": False}
    assert gpu_decode.loader_variant("model_gpu_loader_nested") == {"priority": False, "pad": "nested"}
    every = {"priority": False, "pin_memory": True, "pad": "nested", "dtype": "amp", "fuse": True}
    assert gpu_decode.loader_variant("model_gpu_loader_same_priority_pinned_nested_half_fused") == every
    assert gpu_decode.loader_variant("model_gpu_loader_half_fused") == {"priority": False, "dtype": "amp", "fuse": True}
    probe = gpu_decode.trainer_probe("trainer_gpu_decode_fused")  # the trainer with the loader's fuse=True
    assert probe is not None and json.loads(probe[1]) == {"loader": {"fuse": True}}
    with pytest.raises(BenchmarkError, match="unknown step 'model_gpu_loader_halff'"):
        gpu_decode.loader_variant("model_gpu_loader_halff")


def test_timeline_separates_idle_concurrent_and_per_stream_time():
    import gpu_decode

    ms = 1_000_000
    # stream 7: 0-4 and 6-10 ms; stream 9 overlaps it at 3-5 ms; a copy at 10-12; SMs idle 5-6 and 10-12 of 12 ms
    intervals = [(7, 0, 4 * ms, True), (7, 6 * ms, 10 * ms, True), (9, 3 * ms, 5 * ms, True),
                 (9, 10 * ms, 12 * ms, False)]  # fmt: skip
    res = gpu_decode.timeline(intervals, steps=2, wall_ns=12 * ms)
    assert res == {"wall_ms": 6.0, "busy_ms": 4.5, "idle_ms": 1.5, "concurrent_ms": 0.5,
                   "kernel_ms": {"7": 4.0, "9": 1.0}, "copy_ms": 1.0}  # fmt: skip


def _transfer_metrics(task, sec_per_iter, *, batch, launcher="none", **metrics):
    run = dict(train_sec_per_iter=sec_per_iter, train_data_sec_per_iter=0.01, train_iters=30, world_size=1)
    run.update(train_batch_size_per_gpu=batch, launcher=launcher, device="NVIDIA H100 80GB HBM3")
    return {"task": task, "table": 9 if task == "simplebaseline" else 8, **metrics, "run": run}


def test_gpu_hours_are_s_per_iter_times_the_stock_schedule_on_8_gpus():
    assert gpu_transfer.DET_ITERS == 12 * 7_330 and gpu_transfer.POSE_ITERS == 210 * 293
    assert gpu_transfer.gpu_hours("mask_rcnn", 0.25) == pytest.approx(0.25 * 87_960 * 8 / 3600)
    lines = gpu_transfer.estimate(
        [
            _transfer_metrics("faster_rcnn", 0.25, batch=2),
            _transfer_metrics("faster_rcnn", 9.0, batch=2, launcher="pytorch"),  # the torchrun rerun: not used
            _transfer_metrics("simplebaseline", 0.5, batch=8),  # not the stock batch 64: not used
        ]
    )
    assert "  Table 8 FPN ResNet-50: 0.250 s/iter -> 48.9 GPU-h per run x 3 rows" in lines
    assert "  Table 8 Mask R-CNN ResNet-50: not measured" in lines
    assert "  Table 9 SimpleBaseline ResNet-50: not measured (ran at batch 8, not the stock 64)" in lines
    assert "  total of the rows above: 146.6 GPU-h" in lines


def test_gpu_transfer_summary_row(tmp_path):
    m = _transfer_metrics("faster_rcnn", 0.2, batch=2, **{"coco/bbox_mAP": 0.0123, "note": "nothing detected"})
    (tmp_path / "m.json").write_text(json.dumps(m))
    assert gpu_transfer.row("faster_rcnn", tmp_path / "m.json", 41.4, 0) == (
        "faster_rcnn: faster_rcnn plain x1 | 0.200 s/iter (0.010 waiting for data) over 30 iters at batch 2/GPU "
        "| AP 1.23 | note: nothing detected | NVIDIA H100 80GB HBM3 | wall 41 s | exit 0"
    )
    absent = gpu_transfer.row("mask_rcnn", tmp_path / "absent.json", 3, 124)
    assert absent == "mask_rcnn: no metrics.json | wall 3 s | exit 124"


def test_after_first_batch_leaves_out_the_epochs_fixed_start():
    from common import after_first_batch

    row = {"samples_trained": 1000.0, "img_per_s": 250.0, "first_batch_s": 1.0}  # 4 s loop, 1 s of it waiting
    assert after_first_batch(row) == pytest.approx(1000 / 3)
    assert after_first_batch({"samples_trained": 1000.0, "img_per_s": 250.0}) is None  # a row from before the column


def test_host_overhead_measures_both_loops():
    import host_overhead

    res = host_overhead.per_step_us(steps=20, repeats=1)
    assert res["trainer"] > 0 and res["bare"] > 0 and res["difference"] == res["trainer"] - res["bare"]


def _ranking_benchmark(name: str, tmp_path, data, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """benchmarks/NAME.py on ``data`` for 3 epochs (drops after epochs 2 and 3): its process and its JSON."""
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, str(REPO / f"benchmarks/{name}.py"), "--output", str(out), "--data-dir", str(data),
         "--epochs", "3", "--dap-warmup", "1", "--workers", "1", *flags],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res, json.loads((out / f"{name}.json").read_text())


def test_mixing_attribution_compares_the_two_rankings_at_each_drop(tmp_path, cifar_tiny):
    """A subprocess: the benchmark wraps the engine's and the sampler's functions for the rest of its process."""
    import mixing_attribution

    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert mixing_attribution.spearman(a, a * 2) == pytest.approx(1.0)
    assert mixing_attribution.spearman(a, -a) == pytest.approx(-1.0)
    res, result = _ranking_benchmark("mixing_attribution", tmp_path, cifar_tiny, "--mixup", "0.8")
    assert [d["epoch"] for d in result["drops"]] == [2, 3]  # the embedded config's p=0.9 every epoch after W=1
    for d in result["drops"]:
        assert -1 <= d["spearman"] <= 1 and 0 <= d["dropped_by_both"] <= 1 and d["dropped"] > 0
        controls = [d[k] for k in ("own_b_vs_image_b", "own_b_vs_own_c", "image_b_vs_image_c")]
        assert all(0 <= c <= 1 for c in controls), d  # the two extra draws ran at every drop
    assert "2 drops: Spearman rho" in res.stdout and "control draws" in res.stdout


def test_ranking_noise_reranks_the_subset_at_each_drop(tmp_path, cifar_tiny):
    """A subprocess, as above. The ranking it reads is the one DaP dropped by; every comparison is a share."""
    res, result = _ranking_benchmark("ranking_noise", tmp_path, cifar_tiny)
    assert [d["epoch"] for d in result["drops"]] == [2, 3]
    for d in result["drops"]:
        assert d["training_is_daps_ranking"] and d["dropped"] > 0
        assert all(0 <= d[f"{a}_vs_{b}"] <= 1 and -1 <= d[f"rho_{a}_{b}"] <= 1 for a, b in (("training", "b"),
                   ("b", "c"), ("b", "clean"), ("training", "clean"), ("relative", "b")))  # fmt: skip
        assert d["b_vs_c"] > d["chance"]  # a fixed model under two draws agrees beyond chance
    assert "2 drops; of the first ranking's drops" in res.stdout
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks/ranking_noise.py"), "--mixup", "0.2"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "mixing flags" in refused.stderr
