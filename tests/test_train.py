"""The trainer end to end on real images: DaP and full runs, accounting, LR, baselines, export, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_stubs import FixedLR, RecordingSampler

from dap_pretrain.lr import lr_at
from dap_pretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# Tiny CIFAR schedule: 4 epochs, drop to half after epochs 1 and 2, LR decays (and DaP reuses) at epoch 3.
CIFAR = [
    "--model",
    "cifar_resnet20",
    "-b",
    "64",
    "--workers",
    "1",
    "--lr",
    "0.05",
    "--epochs",
    "4",
    "--decay-milestones",
    "3",
    "--dap-warmup",
    "1",
    "--dap-interval",
    "1",
    "--dap-keep",
    "0.5",
    "--no-plot",
]


def _rows(output: Path) -> list[dict]:
    with (output / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _train(tmp_path, name, data, *extra):
    out = tmp_path / name
    summary = train_main([*CIFAR, "--data-dir", str(data), "--output", str(out), *extra])
    return out, summary


def test_dap_run_accounting_matches_plan(tmp_path, cifar_tiny):
    out, s = _train(tmp_path, "dap", cifar_tiny, "--drop-last")
    rows = _rows(out)
    # 400 samples: epochs 1-2 all, epoch 3 half (drop after 2), epoch 4 all again (reuse at end of 3)
    assert [int(r["subset_size"]) for r in rows] == [400, 400, 200, 400]
    assert s["samples_planned"] == 1400 and s["compute_fraction_planned"] == pytest.approx(1400 / 1600)
    # --drop-last with batch 64 loses 400 % 64 = 16 samples of each 400-epoch and 200 % 64 = 8 of the 200 one
    assert s["samples_untrained"] == 16 * 3 + 8
    assert s["samples_trained"] == 1400 - s["samples_untrained"]
    assert s["compute_fraction_measured"] == pytest.approx(s["samples_trained"] / 1600)
    assert 0 <= s["top1"] <= 100 and s["top5"] >= s["top1"]
    run = json.loads((out / "run.json").read_text())
    for key in (
        "compute_fraction_planned",
        "compute_fraction_measured",
        "samples_trained",
        "top1",
        "top5",
        "wall_time_s",
        "epochs",
        "model",
        "dap",
    ):
        assert key in run
    assert (out / "args.yaml").is_file() and (out / "last.pth.tar").is_file() and (out / "model_best.pth.tar").is_file()


def test_full_run_and_same_lr_per_epoch(tmp_path, cifar_tiny):
    dap_out, dap = _train(tmp_path, "dap", cifar_tiny)
    full_out, full = _train(tmp_path, "full", cifar_tiny, "--dap-select", "none")
    assert full["compute_fraction_measured"] == 1.0 == full["compute_fraction_planned"]
    assert dap["compute_fraction_measured"] == dap["compute_fraction_planned"] == pytest.approx(1400 / 1600)
    dap_rows, full_rows = _rows(dap_out), _rows(full_out)
    # DaP's epoch 3 runs half the steps, yet both runs see the same LR at every epoch
    assert [r["lr"] for r in dap_rows] == [r["lr"] for r in full_rows] == [str(0.05)] * 3 + [str(0.05 * 0.1)] * 1 or [
        float(r["lr"]) for r in dap_rows
    ] == pytest.approx([float(r["lr"]) for r in full_rows])
    assert float(dap_rows[3]["lr"]) == pytest.approx(0.005)
    assert all(0 <= float(r["first_batch_s"]) <= float(r["samples_trained"]) / float(r["img_per_s"]) for r in dap_rows)


def test_lr_is_a_function_of_epoch_progress():
    kw = dict(base_lr=0.1, epochs=120, milestones=(30, 60, 90))
    assert (
        lr_at(29.99, **kw) == 0.1
        and lr_at(30.0, **kw) == pytest.approx(0.01)
        and lr_at(95, **kw) == pytest.approx(1e-4)
    )
    assert lr_at(0.5, warmup_epochs=1, warmup_lr=0.0, **kw) == pytest.approx(0.05)
    cos = dict(base_lr=1.0, sched="cosine", epochs=10)
    assert lr_at(0, **cos) == 1.0 and lr_at(5, **cos) == pytest.approx(0.5) and lr_at(10, **cos) == pytest.approx(0.0)


def test_table2f_baselines(tmp_path, cifar_tiny):
    _, fewer = _train(tmp_path, "fewer", cifar_tiny, "--epochs-scale", "0.5")
    assert fewer["epochs"] == 2 and fewer["compute_fraction_measured"] == pytest.approx(0.5)
    _, fixed = _train(tmp_path, "fixed", cifar_tiny, "--fixed-subset", "0.25")
    assert fixed["compute_fraction_measured"] == pytest.approx(0.25)
    out, rnd = _train(tmp_path, "random", cifar_tiny, "--dap-select", "random")
    assert rnd["compute_fraction_measured"] == pytest.approx(1400 / 1600)


def test_imagenet_sample_resnet18_224(tmp_path, imagenet_tiny):
    out = tmp_path / "r18"
    s = train_main(
        [
            "--model",
            "resnet18",
            "--data-dir",
            str(imagenet_tiny),
            "--img-size",
            "224",
            "-b",
            "8",
            "--epochs",
            "2",
            "--decay-milestones",
            "1",
            "--dap-reuse",
            "--dap-warmup",
            "0",
            "--dap-interval",
            "1",
            "--dap-keep",
            "0.5",
            "--workers",
            "2",
            "--output",
            str(out),
            "--no-plot",
            "--export",
            "--amp",
        ]
    )
    assert s["samples_trained"] == 16 + 8 and s["compute_fraction_measured"] == 0.75
    assert (out / "export" / "backbone.pth").is_file()


def test_export_round_trip(tmp_path, cifar_tiny):
    import timm

    from dap_pretrain.export import export_backbone, load_backbone

    out, s = _train(tmp_path, "dap", cifar_tiny, "--model-ema", "--epochs", "2")
    exp = export_backbone(out / "last.pth.tar", tmp_path / "export")
    meta = json.loads((exp / "meta.json").read_text())
    assert meta["model"] == "cifar_resnet20" and meta["weights"] == "ema"
    assert (meta["top1"], meta["top5"]) == (s["ema_top1"], s["ema_top5"]) and meta["top5"] is not None  # the EMA's
    assert meta["compute_fraction_measured"] == pytest.approx(s["compute_fraction_measured"])
    assert meta["classifier_keys_removed"] == ["fc.bias", "fc.weight"]
    ckpt = torch.load(out / "last.pth.tar", weights_only=True)
    assert ckpt["updates"] == sum(-(-r["samples_trained"] // 64) for r in ckpt["history"])  # updates at -b 64
    model = load_backbone(exp)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict_ema"][k]), k
    feats = load_backbone(exp, features_only=True)
    x = torch.randn(2, 3, 32, 32)
    assert [f.shape[1] for f in feats(x)] == [16, 32, 64]
    backbone = torch.load(exp / "backbone.pth", weights_only=True)
    assert "fc.weight" not in backbone and set(backbone) == set(model.state_dict()) - {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="cifar_resnet20.*cifar_resnet56|cifar_resnet56.*cifar_resnet20"):
        load_backbone(exp, model="cifar_resnet56")
    with pytest.raises(ValueError, match="resnet18"):
        load_backbone(exp / "model.safetensors", model="resnet18")
    assert timm.is_model("cifar_resnet110")


def test_resnet50_export_has_mmdet_resnet_keys(tmp_path):
    """mmdet's/mmpose's ResNet use torchvision's key names; a timm resnet50 export must supply all of them."""
    import timm
    import torchvision

    from dap_pretrain.checkpoint import save_checkpoint
    from dap_pretrain.export import export_backbone

    net = timm.create_model("resnet50", num_classes=1000)
    save_checkpoint(
        {"arch": "resnet50", "num_classes": 1000, "epoch": 1, "state_dict": net.state_dict()}, tmp_path / "last.pth.tar"
    )
    backbone = torch.load(
        export_backbone(tmp_path / "last.pth.tar", tmp_path / "exp") / "backbone.pth", weights_only=True
    )
    tv = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(backbone) == tv


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "dap_pretrain.train", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _assert_one_line_error(res, *words):
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_input_one_line_exit_2(tmp_path, cifar_tiny, capsys):
    """Two as a user runs them (a process: exit code 2 and a one-line stderr, nothing else printed on the way), the
    rest in this process through the same entry point (each subprocess spent about 8 s importing torch and timm)."""
    from dap_pretrain.train import cli

    base = [*CIFAR, "--epochs", "2"]
    _assert_one_line_error(
        _cli(*base, "--data-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")), "does not exist"
    )
    corrupt = tmp_path / "corrupt.pth.tar"
    corrupt.write_bytes(b"not a checkpoint")
    _assert_one_line_error(
        _cli(*base, "--data-dir", str(cifar_tiny), "--resume", str(corrupt), "--output", str(tmp_path / "o7")),
        "unreadable",
    )
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, foreign)
    data = ["--data-dir", str(cifar_tiny)]
    for k, (flags, words) in enumerate(
        [
            (["--data-dir", str(empty)], "no images"),
            ([*data, "--model", "resnet_9000"], "unknown model"),
            ([*data, "--dap-keep", "1.5"], "dap-keep"),
            ([*data, "--dap-reuse", "9"], "dap-reuse"),
            ([*data, "--mixup-mode", "elem"], "--mixup-mode set how batches are mixed"),
            ([*data, "--resume", str(foreign)], "not written by dap-train"),  # a foreign checkpoint
        ]
    ):
        with pytest.raises(SystemExit) as exc:
            cli([*base, *flags, "--output", str(tmp_path / f"in{k}")])
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert exc.value.code == 2 and len(lines) == 1 and words in lines[0], err[-2000:]


def test_output_holding_a_run_is_refused_and_kept(tmp_path, cifar_tiny):
    out, _ = _train(tmp_path, "run", cifar_tiny, "--epochs", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    res = _cli(*CIFAR, "--epochs", "2", "--data-dir", str(cifar_tiny), "--output", str(out))
    _assert_one_line_error(res, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # resuming with another architecture names both
    res = _cli(
        *CIFAR,
        "--epochs",
        "3",
        "--data-dir",
        str(cifar_tiny),
        "--output",
        str(out),
        "--model",
        "cifar_resnet56",
        "--resume",
        str(out / "last.pth.tar"),
    )
    _assert_one_line_error(res, "cifar_resnet20", "cifar_resnet56")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_final_batch_of_one_is_skipped_and_accounted(tmp_path, cifar_tiny):
    """400 samples in batches of 133 leave one sample alone; BatchNorm cannot train on it."""
    _, s = _train(tmp_path, "one", cifar_tiny, "-b", "133", "--epochs", "2", "--dap-select", "none")
    assert s["samples_untrained"] == 2 and s["samples_trained"] == 798
    assert s["compute_fraction_measured"] == pytest.approx(798 / 800)


def test_embedded_default_takes_any_overriding_flag():
    """`tools/pretrain.sh --epochs 6 --dap-keep 0.5` keeps the embedded data and still forms a valid schedule."""
    from dap_pretrain.train import parse_args, run_config

    config = str(REPO / "configs" / "pretrain" / "embedded_cifar10.yaml")
    args = run_config(parse_args(["--config", config, "--epochs", "6", "--dap-keep", "0.5", "--output", "runs/x"]))
    assert (args.data_dir, args.epochs, args.dap_keep, args.output) == ("embedded", 6, 0.5, "runs/x")
    full = run_config(parse_args(["--config", config]))
    assert full.epochs == 20 and full.dap_reuse is None and full.decay_milestones == [10]


@pytest.mark.parametrize(
    "flags, embedded",
    [
        ([], True),
        (["--compare"], True),
        (["--epochs", "6", "--dap-keep", "0.5"], True),
        (["--data-dir", "embedded", "--epochs", "6"], True),
        (["--data-dir=embedded"], True),
        (["--data-dir", "/data/imagenet", "--epochs", "120"], False),
        (["--data-dir=/data/imagenet"], False),
        (["--model", "cifar_resnet56"], True),  # the embedded default with another network
        (["--model", "convnext_tiny", "--data-dir", "/data/imagenet"], False),
        (["--config", "configs/pretrain/imagenet/resnet50_dap75.yaml"], False),
    ],
)
def test_pretrain_sh_adds_the_embedded_config_only_to_runs_on_the_embedded_data(tmp_path, flags, embedded):
    """README's ImageNet example (`tools/pretrain.sh --model convnext_tiny --data-dir /data/imagenet ...`) silently
    took the embedded CIFAR config's warm-up 3, interval 1, LR decay at 10 and weight decay for what it left out.
    The embedded config now applies only while the run stays on the embedded data and names no config."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "DAP_PYTHON": str(fake), "NPROC_PER_NODE": "1", "NNODES": "1"}
    proc = subprocess.run(["bash", "tools/pretrain.sh", *flags], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ("configs/pretrain/embedded_cifar10.yaml" in proc.stdout) == embedded, proc.stdout
    words = proc.stdout.split()
    assert words[words.index("dap_pretrain.train") + 1 + 2 * embedded :] == flags  # the user's flags, unchanged


def test_run_config_is_resolved_once_and_read_only():
    """--epochs-scale is applied into a new read-only RunConfig; the parsed flags are left as given."""
    import dataclasses

    from dap_pretrain.train import parse_args, run_config

    args = parse_args(["--epochs", "300", "--decay-milestones", "150", "225", "--epochs-scale", "0.63"])
    cfg = run_config(args)
    assert (cfg.epochs, cfg.baseline_epochs, cfg.decay_milestones, cfg.dap_select) == (189, 300, [94, 142], "none")
    assert (args.epochs, args.dap_select) == (300, "hard")  # the Namespace is not mutated
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1
    with pytest.raises(AttributeError):
        cfg.epoch  # noqa: B018  (a typo is an error, not None)
    assert cfg.replace(output="x").output == "x" and cfg.output != "x"


def _final_train_loss(out: Path) -> tuple[float, float]:
    rows = _rows(out)
    return float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])


def test_in_memory_path_trains_like_the_jpeg_path(tmp_path, cifar_tiny):
    """Same data, same augmentation distribution: the two paths' loss curves and top-1 agree within noise."""
    flags = ("--dap-select", "none", "--epochs", "6", "--decay-milestones", "5", "--seed", "1")
    mem, m = _train(tmp_path, "mem", cifar_tiny, "--in-memory", "on", *flags)
    jpg, j = _train(tmp_path, "jpg", cifar_tiny, "--in-memory", "off", *flags)
    assert "in-memory data: 400 images" in (mem / "log.txt").read_text()
    assert "in-memory" not in (jpg / "log.txt").read_text()
    (m0, m_end), (j0, j_end) = _final_train_loss(mem), _final_train_loss(jpg)
    assert m_end < m0 - 0.2 and j_end < j0 - 0.2  # both learn
    assert abs(m_end - j_end) < 0.25, (m_end, j_end)
    assert m["top1"] > 15 and j["top1"] > 15 and abs(m["top1"] - j["top1"]) < 15, (m["top1"], j["top1"])
    assert m["samples_trained"] == j["samples_trained"] == 6 * 400


def test_planned_compute_is_a_bound_for_infobatch_without_a_target():
    """InfoBatch prunes by the losses as it goes: without a target, 'planned 100.00%' beside a measured 79% read as
    a miss; the log now calls it a bound."""
    from types import SimpleNamespace

    from dap_pretrain.runner import _planned_text

    ib = SimpleNamespace(dap_select="infobatch", infobatch_target_compute=None)
    assert _planned_text(ib, 1.0) == "planned at most 100.00% (InfoBatch prunes by the losses as it goes)"
    assert _planned_text(SimpleNamespace(dap_select="infobatch", infobatch_target_compute=0.8), 0.8) == "planned 80.00%"
    assert (
        _planned_text(SimpleNamespace(dap_select="hard"), 0.7391, lead="planned compute ") == "planned compute 73.91%"
    )


def test_infobatch_run_reports_its_measured_compute(tmp_path, cifar_tiny):
    out, s = _train(
        tmp_path,
        "ib",
        cifar_tiny,
        "--dap-select",
        "infobatch",
        "--infobatch-target-compute",
        "0.8",
        "--epochs",
        "5",
        "--eval-interval",
        "5",
    )
    rows = _rows(out)
    assert [r["event"] for r in rows][-1] == "anneal" and int(rows[0]["subset_size"]) == 400
    assert min(int(r["subset_size"]) for r in rows) < 400  # something was pruned
    assert s["compute_fraction_measured"] == pytest.approx(sum(int(r["samples_trained"]) for r in rows) / 2000)
    assert abs(s["compute_fraction_measured"] - 0.8) < 0.02
    assert [r["eval_top1"] for r in rows][:4] == ["", "", "", ""] and float(rows[-1]["eval_top1"]) >= 0
    assert f"400 train / 100 val samples from {cifar_tiny}; planned compute 80.00%" in (out / "log.txt").read_text()
    assert s["dap"]["infobatch"]["target_compute"] == 0.8 and s["dap"]["seed"] == 42  # timm's default --seed


def test_cuda_graph_is_refused_on_cpu(tmp_path, cifar_tiny):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dap_pretrain.train",
            *CIFAR,
            "--data-dir",
            str(cifar_tiny),
            "--output",
            str(tmp_path / "g"),
            "--cuda-graph",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--cuda-graph needs a CUDA device" in proc.stderr


def test_compare_trains_the_full_data_baseline_beside_the_run(tmp_path, cifar_tiny, capsys):
    """--compare: the DaP run, then the same flags with all data into OUTPUT/full_data, and both printed."""
    out, s = _train(tmp_path, "cmp", cifar_tiny, "--epochs", "3", "--compare")
    full = json.loads((out / "full_data" / "run.json").read_text())
    assert s["compute_fraction_measured"] < 1.0 and full["compute_fraction_measured"] == 1.0
    assert full["epochs"] == s["epochs"] == 3
    printed = capsys.readouterr().out
    assert "full data" in printed and "DaP top-1" in printed
    # --compare --resume continues both runs, the baseline from its own checkpoint (before: refused in full_data)
    again = train_main([*CIFAR, "--data-dir", str(cifar_tiny), "--epochs", "3", "--compare", "--resume",
                        str(out / "last.pth.tar")])  # fmt: skip
    assert again["top1"] == s["top1"] and "DaP top-1" in capsys.readouterr().out
    assert json.loads((out / "full_data" / "run.json").read_text())["top1"] == full["top1"]
    # a baseline stopped before its first checkpoint is started again; its earlier files are replaced, not refused
    (out / "full_data" / "last.pth.tar").unlink()
    train_main([*CIFAR, "--data-dir", str(cifar_tiny), "--epochs", "3", "--compare", "--resume",
                str(out / "last.pth.tar")])  # fmt: skip
    assert (out / "full_data" / "last.pth.tar").is_file() and "DaP top-1" in capsys.readouterr().out
    # resumed into another folder, the finished baseline continues from its checkpoint beside the resumed run
    moved = tmp_path / "moved"
    train_main([*CIFAR, "--data-dir", str(cifar_tiny), "--epochs", "3", "--compare", "--resume",
                str(out / "last.pth.tar"), "--output", str(moved)])  # fmt: skip
    assert (moved / "full_data" / "summary.csv").read_text() == (out / "full_data" / "summary.csv").read_text()


def test_compare_table_without_evaluation():
    """--compare with --val-split '': top-1 n/a in the table and the difference (before: a TypeError after both
    runs had trained)."""
    from dap_pretrain.train import compare_table

    dap = {"compute_fraction_measured": 0.7, "top1": None, "wall_time_s": 7.0}
    table = compare_table(dap, {"compute_fraction_measured": 1.0, "top1": None, "wall_time_s": 10.0})
    assert "DaP top-1 n/a at 70.0% compute, 70.0% wall-clock" in table
    assert table.splitlines()[2].split() == ["DaP", "70.0%", "n/a", "7.0"]
    table = compare_table({**dap, "top1": 61.5}, {"compute_fraction_measured": 1.0, "top1": 60.0, "wall_time_s": 10.0})
    assert "DaP top-1 +1.50 points at 70.0% compute" in table


class _SlowStart:
    """Three batches of a linear model's data, the first after ``delay`` seconds (workers starting up)."""

    def __init__(self, delay: float):
        self.delay = delay
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen)

    def __len__(self):
        return 3

    def __iter__(self):
        time.sleep(self.delay)
        for s in range(0, 12, 4):
            yield self.x[s : s + 4], self.y[s : s + 4], torch.arange(s, s + 4)


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_epoch_reports_its_wait_for_the_first_batch(delay):
    """``first_batch_s`` (summary.csv, and the epoch's log line from 0.05 s) is the part of the training loop's
    seconds spent before the first batch arrived: the epoch's fixed start, which ``img_per_s`` includes."""
    from dap_pretrain.engine import train_one_epoch

    model = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, _SlowStart(delay), opt, epoch=0, sampler=RecordingSampler(), lr_scheduler=FixedLR(),
                            device=torch.device("cpu"), show_progress=False)  # fmt: skip
    assert delay <= stats.first_batch_s <= stats.seconds, stats
    assert stats.first_batch_s < delay + 0.1, stats  # the wait, not the steps after it
    assert stats.samples == 12


def test_cuda_runs_get_timms_cudnn_and_tf32_settings():
    """As timm's train.py: on CUDA cuDNN autotunes and float32 matmuls may use TF32; a CPU run changes nothing."""
    from dap_pretrain.distributed import cuda_speed_flags

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, matmul.allow_tf32
    try:
        cudnn.benchmark = matmul.allow_tf32 = False
        cuda_speed_flags(torch.device("cpu"))
        assert not cudnn.benchmark and not matmul.allow_tf32
        cuda_speed_flags(torch.device("cuda", 0))  # a device object: the flags need no GPU to be set
        assert cudnn.benchmark and matmul.allow_tf32
    finally:
        cudnn.benchmark, matmul.allow_tf32 = before


class _StepsSeen:
    """A ModelEmaV3 stand-in that records the step each update is given."""

    def __init__(self):
        self.steps = []

    def update(self, model, step):
        self.steps.append(step)


def test_ema_steps_count_optimizer_updates_across_shorter_epochs_and_accumulation():
    """The EMA decays by the run's update count, as timm's num_updates: with --grad-accum-steps 3 the first update
    is step 1 (timm's EMA then copies the model, decay 0), and an epoch after a DaP drop continues the count
    (``epoch * steps + step`` gave 2 and 5, then 5 again)."""
    from timm.utils import ModelEmaV3

    from dap_pretrain.engine import train_one_epoch

    def epoch(n_batches, ema, *, epoch, updates):
        torch.manual_seed(epoch)
        batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)), torch.arange(4)) for _ in range(n_batches)]
        return train_one_epoch(model, batches, opt, epoch=epoch, sampler=RecordingSampler(), lr_scheduler=FixedLR(),
                               device=torch.device("cpu"), model_ema=ema, grad_accum_steps=3, show_progress=False,
                               updates=updates)  # fmt: skip

    model = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = _StepsSeen()
    first = epoch(6, seen, epoch=0, updates=0)
    second = epoch(3, seen, epoch=1, updates=first.updates)  # a DaP epoch: half the batches
    assert seen.steps == [1, 2, 3] and (first.updates, second.updates) == (2, 3)
    ema = ModelEmaV3(model, decay=0.9998)
    epoch(3, ema, epoch=0, updates=0)  # one update, the run's first: the EMA is the model
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), model.parameters(), strict=True))


def test_model_ema_warmup_reaches_timms_ema(tmp_path, cifar_tiny, monkeypatch):
    import timm.utils

    made = []

    class Recording(timm.utils.ModelEmaV3):
        def __init__(self, model, **kwargs):
            made.append(kwargs)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(timm.utils, "ModelEmaV3", Recording)
    _train(tmp_path, "warm", cifar_tiny, "--model-ema", "--model-ema-warmup", "--epochs", "2")
    assert made == [{"decay": 0.9998, "use_warmup": True}]


def test_checkpoints_without_an_update_count_resume_with_the_count_their_epochs_imply():
    from dap_pretrain.runner import _updates_implied

    ckpt = {"args": {"batch_size": 64, "grad_accum_steps": 1}, "history": [{"samples_trained": 400},
                                                                           {"samples_trained": 200}]}  # fmt: skip
    assert _updates_implied(ckpt, world=1) == 7 + 4 and _updates_implied(ckpt, world=2) == 4 + 2
    ckpt["args"]["grad_accum_steps"] = 2
    assert _updates_implied(ckpt, world=1) == 4 + 2


def test_the_graphed_step_is_recorded_and_logged_like_the_eager_one(caplog):
    """--cuda-graph's step skipped the --log-interval line (a `continue` before it). A stand-in for the graph (it
    runs on CUDA only) takes every batch: each batch's losses are recorded, and the interval's lines are logged."""
    import logging

    from dap_pretrain.engine import train_one_epoch

    class GraphStandIn:
        def accepts(self, images):
            return True

        def __call__(self, images, targets, weights):
            return torch.nn.functional.cross_entropy(model(images), targets, reduction="none").detach()

    model = torch.nn.Linear(8, 3)
    batches = [(torch.randn(4, 8), torch.randint(0, 3, (4,)), torch.arange(4 * i, 4 * i + 4)) for i in range(5)]
    sampler = RecordingSampler()
    with caplog.at_level(logging.INFO, logger="dap_pretrain.engine"):
        stats = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), epoch=0, sampler=sampler,
                                lr_scheduler=FixedLR(), device=torch.device("cpu"), graph_step=GraphStandIn(),
                                log_interval=2, show_progress=False)  # fmt: skip
    assert sampler.indices == list(range(20)) and stats.updates == 5
    steps = [r.getMessage().split(" loss ")[0] for r in caplog.records if " step " in r.getMessage()]
    assert steps == ["epoch 1 step 0/5", "epoch 1 step 2/5", "epoch 1 step 4/5"], steps


def test_a_decay_milestone_past_the_last_epoch_is_warned(tmp_path, cifar_tiny):
    """The embedded default with ``--epochs 6`` kept its milestone 10: the LR never decayed, and nothing said so."""
    flags = ["--data-dir", str(cifar_tiny), "--model", "test_resnet", "--img-size", "32", "-b", "100", "-j", "0",
             "--epochs", "2", "--decay-milestones", "1", "5", "--dap-warmup", "1", "--no-plot", "--device", "cpu",
             "--output", str(tmp_path / "run"), "--eval-interval", "100"]  # fmt: skip
    train_main(flags)
    warned = [ln for ln in (tmp_path / "run" / "log.txt").read_text().splitlines() if "--decay-milestones" in ln]
    assert len(warned) == 1 and warned[0].endswith(
        "--decay-milestones 5: at or after the end of training (2 epochs), so the LR never decays there; pass "
        "milestones below 2 to decay it, or --decay-milestones with no value for a constant LR"
    ), warned
