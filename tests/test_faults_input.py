"""Bad input from issue 11's fault list: each gives a one-line error (exit 2) before training, or a warning naming it.

Class-folder faults run on real CIFAR-10 JPEGs (the point is timm's real label numbering); the 16-bit PNG is made
with PIL, since the point is its bit depth.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from dap_pretrain.data.dataset import DataError, check_batch_size, create_dataset, dataset_classes
from dap_pretrain.data.sampler import DaPSampler, LossRecorder, NonFiniteLossError
from dap_pretrain.errors import UsageError
from dap_pretrain.train import cli as train_cli

CLASSES = ("airplane", "automobile", "bird")
REPO = Path(__file__).resolve().parents[1]


def _tree(src: Path, root: Path, layout: dict[str, tuple[str, ...]], per_class: int = 3) -> Path:
    """``root/<split>/<class>/`` linked from the real ``cifar_tiny`` images; a class named with '-' prefix is empty."""
    for split, classes in layout.items():
        for cls in classes:
            empty = cls.startswith("-")
            cls = cls.lstrip("-")
            (root / split / cls).mkdir(parents=True)
            if empty:
                continue
            for f in sorted((src / split / cls).iterdir())[:per_class]:
                os.link(f, root / split / cls / f.name)
    return root


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        train_cli(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- (3) empty class folders ------------------------------------------------------------------------------------------


def test_empty_train_class_folder_is_one_line_error_before_training(tmp_path, cifar_tiny, capsys):
    root = _tree(cifar_tiny, tmp_path / "data", {"train": ("airplane", "-automobile", "bird"), "val": CLASSES})
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=root, split="train", is_training=True)
    message = _one_line(excinfo)
    assert str(root / "train" / "automobile") in message and "remove the folder or add images" in message
    # through the entry point: exit 2 before anything trains (was an IndexError after a full epoch)
    out = tmp_path / "run"
    line = _cli_error(
        capsys, "--data-dir", str(root), "--output", str(out), "--epochs", "2", "--dap-warmup", "1", "--no-plot"
    )
    assert str(root / "train" / "automobile") in line
    assert not (out / "summary.csv").exists() and not (out / "last.pth.tar").exists()


def test_val_read_with_train_class_map_keeps_labels_aligned_and_warns(tmp_path, cifar_tiny, caplog):
    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES, "val": ("-airplane", "automobile", "bird")})
    train = create_dataset(name="", root=root, split="train", is_training=True)
    classes = dataset_classes(train)
    assert classes == {"airplane": 0, "automobile": 1, "bird": 2}
    # on its own map timm would number val's automobile 0 and bird 1 (a perfect model scored top-1 0.00): refused
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=root, split="val", is_training=False)
    assert str(root / "val" / "airplane") in _one_line(excinfo)
    with caplog.at_level(logging.WARNING, logger="dap_pretrain.data.dataset"):
        val = create_dataset(name="", root=root, split="val", is_training=False, class_to_idx=classes)
    by_class = {Path(p).parent.name: t for p, t in val.reader.samples}
    assert by_class == {"automobile": 1, "bird": 2}  # the train split's labels
    assert "1 of the train split's 3 classes have no images" in caplog.text and "(airplane)" in caplog.text


def test_trainer_with_an_empty_val_class_trains_with_aligned_labels(tmp_path, cifar_tiny):
    from dap_pretrain.train import main as train_main

    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES, "val": ("-airplane", "automobile", "bird")}, 8)
    out = tmp_path / "run"
    s = train_main(
        [
            "--data-dir",
            str(root),
            "--output",
            str(out),
            "--epochs",
            "1",
            "-b",
            "8",
            "-j",
            "0",
            "--dap-warmup",
            "0",
            "--no-plot",
        ]
    )
    assert s["num_samples"] == 24 and 0 <= s["top1"] <= 100
    assert "have no images" in (out / "log.txt").read_text()


def test_val_class_missing_from_train_is_one_line_error(tmp_path, cifar_tiny):
    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES[:2], "val": CLASSES})
    classes = dataset_classes(create_dataset(name="", root=root, split="train", is_training=True))
    with pytest.raises(DataError) as excinfo:  # timm would silently drop val/bird's images
        create_dataset(name="", root=root, split="val", is_training=False, class_to_idx=classes)
    message = _one_line(excinfo)
    assert str(root / "val" / "bird") in message and "train split does not have" in message


# -- (6) YAML configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- lr: 0.1\n", ("holds a list at the top level", "expected a mapping")),
        ("_base_: 5\nlr: 0.1\n", ("_base_: 5", "expected a file name")),
        ("_base_: [base.yaml, 5]\n", ("_base_:", "expected a file name")),
        ("just a string\n", ("holds a str at the top level",)),
        ("_base_: nothere.yaml\n", ("has _base_: nothere.yaml, but", "nothere.yaml does not exist; fix that line")),
        ("# lr f\xfcr ImageNet\nepochs: 2\n", ("is not UTF-8 text", "save it as UTF-8")),  # Latin-1: a traceback
        ("opt_kwargs: 5\n", ("opt_kwargs: 5 is invalid: write a mapping",)),  # a TypeError traceback
    ],
)
def test_malformed_yaml_config_is_one_line_usage_error(tmp_path, capsys, text, words):
    (tmp_path / "base.yaml").write_text("lr: 0.2\n")
    config = tmp_path / "bad.yaml"
    config.write_bytes(text.encode("latin-1"))
    line = _cli_error(capsys, "--config", str(config), "--output", str(tmp_path / "run"))
    assert str(config) in line
    for w in words:
        assert w in line, line
    assert not (tmp_path / "run").exists()


def test_kwargs_in_a_config_take_the_command_lines_forms_too(tmp_path):
    """`opt_kwargs: "nesterov=False"` (the command line's form) and `model_kwargs: null` were TypeError tracebacks."""
    from dap_pretrain.train import parse_args

    for text, opt in (('opt_kwargs: "nesterov=False eps=1e-3"', {"nesterov": False, "eps": 1e-3}),
                      ("opt_kwargs: [nesterov=False]", {"nesterov": False}), ("opt_kwargs: null", {}),
                      ("opt_kwargs: {nesterov: true}", {"nesterov": True})):  # fmt: skip
        (tmp_path / "c.yaml").write_text(text + "\nmodel_kwargs: null\n")
        args = parse_args(["--config", str(tmp_path / "c.yaml")])
        assert args.opt_kwargs == opt and args.model_kwargs == {}, text


# -- (7) batch size vs data, 16-bit PNG, one class, NaN loss ---------------------------------------------------------


def test_batch_larger_than_data_with_drop_last_is_refused():
    with pytest.raises(DataError) as excinfo:
        check_batch_size(num_samples=100, batch_size=128, drop_last=True)
    message = _one_line(excinfo)
    assert "--batch-size 128" in message and "100 training samples" in message and "-b 100" in message
    with pytest.raises(DataError, match="per process"):
        check_batch_size(num_samples=200, batch_size=128, drop_last=True, num_replicas=2)
    with pytest.raises(DataError, match="smallest epoch's subset"):
        check_batch_size(num_samples=200, batch_size=64, drop_last=True, smallest_subset=50)
    check_batch_size(num_samples=100, batch_size=128, drop_last=False)  # one partial batch trains
    check_batch_size(num_samples=200, batch_size=64, drop_last=True, smallest_subset=64)


def test_check_passes_and_leaves_nothing_behind(tmp_path, capsys, cifar_tiny, monkeypatch):
    """--check N (tools/pretrain.sh's before torchrun): every input checked in one process, nothing written, not
    even the run folder or its lock file; an existing run's folder is left byte for byte. A job scheduler's
    WORLD_SIZE/RANK in the environment does not make it join (and wait for) a process group."""
    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="9").items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "a" / "run"
    flags = ["--data-dir", str(cifar_tiny), "--model", "cifar_resnet20", "--epochs", "2", "--dap-warmup", "1"]
    flags += ["--output", str(out)]
    assert train_cli([*flags, "--check", "2"]) == 0
    assert f"dap-train: inputs ok for 2 processes -> {out}" in capsys.readouterr().out
    assert not (tmp_path / "a").exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / "run.json").write_text("{}")
    line = _cli_error(capsys, *flags[:-1], str(held), "--check", "2")
    assert "output folder" in line and sorted(p.name for p in held.iterdir()) == ["run.json"]
    assert "--check 0 is invalid" in _cli_error(capsys, *flags, "--check", "0")
    # --compare: the baseline's folder too, which the real run reaches only after the whole DaP run
    (out / "full_data").mkdir(parents=True)
    (out / "full_data" / "run.json").write_text("{}")
    line = _cli_error(capsys, *flags, "--compare", "--check", "2")
    assert f"output folder {out / 'full_data'} holds an earlier run" in line, line


def test_infobatch_with_drop_last_is_checked_against_the_fewest_it_can_keep(tmp_path, capsys, cifar_tiny):
    """Was skipped for InfoBatch: 2 processes, 1,000 samples, -b 400 --drop-last trained nothing from epoch 2 on,
    silently (its pruned set, 765, is 382 per process). The check runs for 2 processes in one (--check 2)."""
    from dap_pretrain.data.infobatch import MAX_RATIO, InfoBatchSampler
    from dap_pretrain.runner import _build_sampler, _smallest_subset
    from dap_pretrain.train import parse_args, run_config

    assert InfoBatchSampler(1000, epochs=4, ratio=0.5).fewest_samples() == 500
    calibrated = InfoBatchSampler(1000, epochs=4, target_compute=0.8)
    assert calibrated.fewest_samples() == 1000 - int(MAX_RATIO * 1000)
    cfg = run_config(parse_args(["--dap-select", "infobatch", "--epochs", "4", "--drop-last", "-b", "400"]))
    sampler, *_ = _build_sampler(cfg, 1000, 2, 0)
    assert _smallest_subset(cfg, sampler) == 500
    # cifar_tiny: 400 samples, at least 200 kept, 100 per process; 200 per process before any pruning
    line = _cli_error(capsys, "--data-dir", str(cifar_tiny), "--dap-select", "infobatch", "--epochs", "4",
                      "--decay-milestones", "--drop-last", "-b", "150", "--output", str(tmp_path / "run"),
                      "--check", "2")  # fmt: skip
    assert "smallest epoch's subset (100 samples per process)" in line and "lower --infobatch-ratio" in line, line
    assert not (tmp_path / "run").exists()


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_16bit_png_is_named_in_a_warning(tmp_path, caplog):
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    for cls in ("a", "b"):
        _png(tmp_path / "deep" / "train" / cls / "0.png", ramp)
        _png(tmp_path / "flat" / "train" / cls / "0.png", (ramp >> 8).astype(np.uint8))
    first = tmp_path / "deep" / "train" / "a" / "0.png"
    with Image.open(first) as img:  # what the hazard is: PIL reads it as I;16 and convert('RGB') clips to white
        assert img.mode.startswith("I") and np.asarray(img.convert("RGB")).mean() > 250
    with caplog.at_level(logging.WARNING, logger="dap_pretrain.data.dataset"):
        create_dataset(name="", root=tmp_path / "deep", split="train", is_training=True)
    assert str(first) in caplog.text and "16-bit" in caplog.text and "8-bit" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dap_pretrain.data.dataset"):
        create_dataset(name="", root=tmp_path / "flat", split="train", is_training=True)
    assert "16-bit" not in caplog.text


def test_one_class_training_split_is_refused(tmp_path, cifar_tiny):
    root = _tree(cifar_tiny, tmp_path / "data", {"train": ("airplane",), "val": ("airplane",)})
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=root, split="train", is_training=True)
    message = _one_line(excinfo)
    assert "1 class (airplane)" in message and ">= 2" in message
    assert len(create_dataset(name="", root=root, split="val", is_training=False)) == 3  # evaluation may have one


def test_nonfinite_loss_names_sample_and_epoch_and_a_real_fix():
    sampler = DaPSampler(8, select="none", seed=0)
    sampler.set_epoch(2)
    with pytest.raises(NonFiniteLossError) as excinfo:
        sampler.record(torch.tensor([5, 6]), torch.tensor([1.0, float("nan")]))
    message = _one_line(excinfo)
    assert "sample index 6" in message and "epoch 3" in message
    assert "--lr" in message and "--clip-grad" in message and "nonfinite" not in message
    assert (excinfo.value.index, excinfo.value.epoch) == (6, 3)
    again = pickle.loads(pickle.dumps(excinfo.value))  # crosses process boundaries intact
    assert str(again) == message
    # the recorder alone (no sampler) still names the sample; the check deferred to synchronize() does too
    recorder = LossRecorder(4)
    recorder._sums[1] = float("inf")
    with pytest.raises(NonFiniteLossError, match="sample index 1 is inf: training diverged"):
        recorder.synchronize()


# -- speed: intra-op threads ------------------------------------------------------------------------------------------


def test_busy_cores_now_reads_the_machine():
    import threading

    from dap_pretrain.distributed import busy_cores_now

    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])  # one core busy
    spinner.start()
    try:
        busy = busy_cores_now(0.3)
    finally:
        stop.set()
        spinner.join()
    assert 0.5 <= busy <= (os.cpu_count() or 1) + 1e-6  # at least the spinning thread, at most every core


def test_pick_threads_leaves_room_for_workers_and_other_processes(monkeypatch):
    from dap_pretrain import distributed
    from dap_pretrain.distributed import pick_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: 3.2)  # the others keep 3 cores busy right now
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert pick_threads(workers=2, device_type="cpu", environ={})[0] == 6
    assert pick_threads(workers=2, device_type="cuda", environ={})[0] == 8  # workers run beside the GPU's host
    assert pick_threads(workers=2, device_type="cpu", environ={"LOCAL_WORLD_SIZE": "2"})[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (3.4, 0.0, 0.0))  # three busy processes elsewhere
    n, note = pick_threads(workers=2, device_type="cpu", environ={})
    assert n == 3 and "load 3.2" in note and "OMP_NUM_THREADS" in note  # the lower of average (3.4) and now
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: 0.1)  # a job that ended: the average still counts it
    n, note = pick_threads(workers=2, device_type="cpu", environ={})
    assert n == 6 and "from other processes" not in note
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: None)  # no /proc/stat: the average alone
    assert pick_threads(workers=2, device_type="cpu", environ={})[0] == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert pick_threads(workers=2, device_type="cpu", environ={})[0] == 1  # never below one
    assert pick_threads(workers=2, device_type="cpu", environ={"OMP_NUM_THREADS": "5"}) == (
        5,
        "intra-op threads 5 (OMP_NUM_THREADS)",
    )
    assert pick_threads(workers=2, device_type="cpu", environ={"OMP_NUM_THREADS": "4,2"})[0] == 4  # nested form
    for env in ({"OMP_NUM_THREADS": "abc"}, {"LOCAL_WORLD_SIZE": "x"}):  # were int()'s tracebacks
        with pytest.raises(UsageError, match="^(OMP_NUM_THREADS=abc|LOCAL_WORLD_SIZE=x) is not a"):
            pick_threads(workers=2, device_type="cpu", environ=env)


def test_launch_environment_that_is_not_a_run_is_one_line(tmp_path, capsys, monkeypatch, cifar_tiny):
    """A scheduler's WORLD_SIZE without torchrun failed in init_process_group with a traceback, after --check
    passed; NPROC_PER_NODE=auto (torchrun's word) made tools/pretrain.sh print bash's 'integer expression expected'
    and train one process, exit 0. Both are one line and exit 2 now, with nothing written."""
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_tiny), "--epochs", "1", "--dap-warmup", "0", "--output", str(out)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    line = _cli_error(capsys, *flags)
    assert "WORLD_SIZE=2 is set, but not the rest of torchrun's environment (RANK, MASTER_ADDR" in line, line
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert "WORLD_SIZE=two is not a whole number" in _cli_error(capsys, *flags)
    assert not out.exists()
    monkeypatch.delenv("WORLD_SIZE")
    for script in ("pretrain.sh", "pretrain_mm.sh"):
        for name, value in (("NPROC_PER_NODE", "auto"), ("NNODES", "0"), ("NODE_RANK", "-1"), ("NODE_RANK", "1")):
            env, words = {name: value}, f"{name}={value} is invalid; set it to"  # rank 1 of NNODES=1: no such node
            res = subprocess.run(["bash", str(REPO / "tools" / script), *flags], capture_output=True, text=True,
                                 env={**os.environ, **env}, timeout=60)  # fmt: skip
            assert res.returncode == 2 and res.stderr == f"{script}: error: {res.stderr.split(': error: ')[1]}", res
            assert words in res.stderr and res.stderr.count("\n") == 1 and not out.exists()
    env = {**os.environ, "NPROC_PER_NODE": "01", "NODE_RANK": "0"}
    res = subprocess.run(["bash", str(REPO / "tools" / "pretrain.sh"), *flags, "--check"], capture_output=True,
                         text=True, env=env, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "inputs ok for 1 process" in res.stdout, res.stderr  # torchrun reads 01 as 1


def test_unreadable_images_are_named_and_not_counted_as_trained(tmp_path, cifar_tiny, capsys):
    """(7) A 0-byte and a truncated JPEG: each epoch skips them with a warning naming them, reports them untrained
    and records no loss for them (timm would have handed back the next file's image under their index)."""
    from dap_pretrain.train import main as train_main

    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES, "val": CLASSES}, 8)
    empty = sorted((root / "train" / "bird").iterdir())[3]
    truncated = sorted((root / "train" / "airplane").iterdir())[3]  # not the first: that one is checked up front
    data = truncated.read_bytes()
    empty.unlink()
    empty.write_bytes(b"")
    truncated.unlink()
    truncated.write_bytes(data[: len(data) // 3])
    flags = ["--data-dir", str(root), "--epochs", "2", "-b", "8", "-j", "0", "--dap-warmup", "1", "--no-plot"]
    out = tmp_path / "run"
    s = train_main([*flags, "--output", str(out), "--in-memory", "off"])
    rows = [r for r in (out / "summary.csv").read_text().splitlines()[1:]]
    assert s["num_samples"] == 24 and len(rows) == 2
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    first = dict(zip(header, rows[0].split(","), strict=True))
    assert int(first["samples_trained"]) == 22 and int(first["untrained"]) == 2
    log = (out / "log.txt").read_text() + capsys.readouterr().out
    assert str(empty) in log or empty.name in log
    # the in-memory path decodes everything once at the start: there an unreadable file is a one-line error
    line = _cli_error(capsys, *flags, "--output", str(tmp_path / "run2"), "--in-memory", "on")
    assert "cannot be decoded" in line and ("bird" in line or "airplane" in line)


# -- flags a user can get wrong before anything runs --------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, words",
    [
        (["-b", "0"], "--batch-size=0 is invalid: must be an integer >= 1"),
        (["-vb", "0"], "--validation-batch-size=0 is invalid"),
        (["--workers", "-1"], "--workers=-1 is invalid: must be an integer >= 0"),
        (["--log-interval", "0"], "--log-interval=0 is invalid: must be an integer >= 1"),
        (["--device", "nonsense"], "--device nonsense is not a device name"),
        (["--device", "mps"], "this torch has no usable mps device"),  # MPS made absent below, on any machine
        (["--model-kwargs", "notkv"], "--model-kwargs takes KEY=VALUE items, not notkv"),
        (["--opt-kwargs", "=1"], "--opt-kwargs takes KEY=VALUE items"),
        (["--lr", "0.2", "--lr-base", "0.1"], "--lr sets the LR and --lr-base sets it from the global batch size"),
        (["--smoothing", "1.5"], "--smoothing=1.5 is invalid: must be in [0, 1)"),
        (["--drop-path", "1.5"], "--drop-path=1.5 is invalid: must be in [0, 1)"),
        (["--color-jitter", "-1"], "--color-jitter=-1.0 is invalid: must be >= 0"),
        (["--model-ema-decay", "2"], "--model-ema-decay=2.0 is invalid: must be in [0, 1]"),
        (["--warmup-epochs", "-2"], "--warmup-epochs=-2.0 is invalid: must be >= 0"),
        (["--reprob", "2"], "--reprob=2.0 is invalid: must be in [0, 1]"),
        (["--scale", "0.5", "0.2"], "--scale 0.5 0.2 is invalid: two values 0 <= MIN <= MAX"),
        (["--ratio", "0", "1"], "--ratio 0.0 1.0 is invalid: two values 0 < MIN <= MAX"),
        (["--num-classes", "2"], "--num-classes 2 is fewer than the 10 classes of"),
        (["--sched", "cosine", "--decay-milestones", "1"], "--decay-milestones sets --sched step's decays"),
    ],
    ids=[
        "batch-0",
        "val-batch-0",
        "workers-neg",
        "log-0",
        "device-name",
        "device-absent",
        "model-kwargs",
        "opt-kwargs",
        "lr",
        "smoothing",
        "drop-path",
        "color-jitter",
        "ema-decay",
        "warmup-epochs",
        "reprob",
        "scale",
        "ratio",
        "num-classes",
        "cosine-milestones",
    ],  # fmt: skip
)
def test_bad_flags_are_one_line_and_overwrite_keeps_the_old_run(
    tmp_path, cifar_tiny, capsys, monkeypatch, flags, words
):
    """Each was a traceback (ZeroDivisionError, ValueError, RuntimeError from torch, some at the first step), or was
    taken silently (--lr beside --lr-base, --model-ema-decay 2, --warmup-epochs -2, --reprob 2);
    -b 0 with --overwrite deleted the finished run in the folder before it failed."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("the earlier run")
    line = _cli_error(capsys, "--data-dir", str(cifar_tiny), "--epochs", "2", "--dap-warmup", "1", "--overwrite",
                      "--output", str(out), *flags)  # fmt: skip
    assert words in line, line
    assert (out / "run.json").read_text() == "the earlier run" and sorted(p.name for p in out.iterdir()) == ["run.json"]


@pytest.mark.parametrize(
    "flags",
    [
        ["--min-lr", "0.5"],  # above --lr: not read by the step schedule, and timm takes it
        ["--sched", "cosine", "--min-lr", "0.2", "--lr", "0.05", "--lr-base-size", "256"],  # scaled LR decides
        ["--scale", "0.08", "1.5"],  # timm: a centre crop where the area cannot fit
        ["--scale", "0", "1"],
        ["--sched", "cosine", "--decay-milestones"],  # no milestones: nothing ignored
        ["--smoothing", "0", "--drop-path", "0", "--warmup-epochs", "0.5", "--lr", "0"],
    ],
    ids=["min-lr-step", "min-lr-scaled", "scale-above-1", "scale-0", "cosine-no-milestones", "zeros"],
)
def test_values_timm_takes_are_not_refused(flags):
    """The range checks refuse only what would fail or be silently wrong; what timm's train.py takes and uses
    stays allowed (a review found --min-lr and --scale refused where timm trains)."""
    from dap_pretrain.config import run_config
    from dap_pretrain.train import parse_args

    run_config(parse_args(["--data-dir", "x", "--epochs", "4", "--dap-warmup", "1", *flags]))


def test_cuda_device_on_a_machine_without_one_is_one_line(tmp_path, cifar_tiny, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _cli_error(capsys, "--data-dir", str(cifar_tiny), "--device", "cuda", "--output", str(tmp_path / "r"))
    assert "--device cuda: this torch has no usable cuda device; pass --device auto or cpu" in line
    assert not (tmp_path / "r").exists()


def test_a_train_split_that_is_not_there_is_refused_where_other_splits_are(tmp_path, cifar_tiny, capsys):
    """--train-split nosuch beside train/ and val/: timm reads the whole root for training, so the run trained on
    val's images and evaluated on them, without a word. Now one line naming the folders, before the run folder."""
    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES, "val": CLASSES})
    line = _cli_error(capsys, "--data-dir", str(root), "--train-split", "nosuch", "--epochs", "2", "--dap-warmup",
                      "1", "--output", str(tmp_path / "run"))  # fmt: skip
    assert "has no nosuch/ folder but has train/, val/" in line and "--train-split train" in line, line
    assert not (tmp_path / "run").exists()
    flat = _tree(cifar_tiny, tmp_path / "flat", {"train": CLASSES}) / "train"  # class folders only: as before
    assert len(create_dataset(name="", root=flat, split="train", is_training=True)) == 3 * len(CLASSES)


def test_evaluating_on_the_training_images_is_warned(tmp_path, cifar_tiny, caplog):
    """A --data-dir of class folders without train/ and val/ is read whole for both splits (as timm does): the run
    evaluated on the images it trained on, without a word."""
    root = _tree(cifar_tiny, tmp_path / "flat", {"train": CLASSES})
    flat = tmp_path / "classes"
    (root / "train").rename(flat)
    train = create_dataset(name="", root=flat, split="train", is_training=True)
    with caplog.at_level(logging.WARNING):
        create_dataset(name="", root=flat, split="val", is_training=False, class_to_idx=dataset_classes(train))
    assert any("has no val/ folder, so evaluation reads every image under it" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        full = create_dataset(name="", root=cifar_tiny, split="train", is_training=True)
        create_dataset(name="", root=cifar_tiny, split="val", is_training=False, class_to_idx=dataset_classes(full))
    assert not any("no val/ folder" in r.getMessage() for r in caplog.records)
    out = tmp_path / "run"  # the same split named twice: trained and evaluated on one folder, without a word
    train_cli(["--data-dir", str(cifar_tiny), "--val-split", "train", "--epochs", "1", "--dap-warmup", "0",
               "--output", str(out), "--no-plot"])  # fmt: skip
    assert (
        "--val-split train is the training split: top-1 then measures the images it trains on"
        in (out / "log.txt").read_text()
    )


def test_a_path_that_is_not_what_the_flag_wants_says_what_it_is(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "is a symlink that leads nowhere (dangling, or a loop)" in _cli_error(capsys, "--data-dir", str(loop))
    assert f"config file {tmp_path} is a folder" in _cli_error(capsys, "--config", str(tmp_path))  # 'does not exist'
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth.tar").write_bytes(b"")  # a run folder: its checkpoint is named, not model.safetensors
    line = _cli_error(capsys, "--initial-checkpoint", str(run), "--output", str(tmp_path / "new"), "--check")
    assert f"is a folder; pass a weights file, e.g. {run / 'last.pth.tar'}" in line, line


# -- --dataset names as timm reads them -------------------------------------------------------------------------------


def test_unprefixed_dataset_names_are_folders_with_the_folder_checks(tmp_path, cifar_tiny, capsys):
    """timm reads '--dataset imagenet' (any name without a known prefix) as a folder; it skipped our class checks, so
    an empty class folder shifted labels again. Now the same checks as '' (and archives are extracted too)."""
    root = _tree(cifar_tiny, tmp_path / "data", {"train": ("airplane", "-automobile", "bird"), "val": CLASSES})
    out = tmp_path / "run"
    line = _cli_error(capsys, "--dataset", "imagenet", "--data-dir", str(root), "--output", str(out))
    assert str(root / "train" / "automobile") in line and not out.exists()
    good = _tree(cifar_tiny, tmp_path / "good", {"train": CLASSES, "val": CLASSES})
    for name in ("imagenet", "Folder/x"):
        train = create_dataset(name=name, root=good, split="train", is_training=True)
        assert train.reader.class_to_idx == {c: i for i, c in enumerate(CLASSES)}
        given = {"bird": 0, "airplane": 1, "automobile": 2}  # not val's own alphabetical numbering
        val = create_dataset(name=name, root=good, split="val", is_training=False, class_to_idx=given)
        assert {(Path(p).parent.name, t) for p, t in val.reader.samples} == set(given.items())


@pytest.mark.parametrize("name", ["wds/imagenet", "TFDS/imagenet2012", "hfids/timm/imagenet-1k"])
def test_streaming_datasets_are_refused_before_their_packages_load(tmp_path, capsys, monkeypatch, name):
    """timm's wds/, tfds/, hfids/ datasets are iterable: no sample index, so DaP can neither rank nor drop. They
    were a traceback (webdataset/tensorflow/datasets missing) and, installed, would fail at the first batch."""

    def not_called(*args, **kwargs):
        raise AssertionError("timm's create_dataset was called")

    monkeypatch.setattr(timm.data, "create_dataset", not_called)
    out = tmp_path / "run"
    line = _cli_error(capsys, "--dataset", name, "--data-dir", str(tmp_path), "--output", str(out))
    assert f"--dataset {name}:" in line and "as a stream" in line and "ImageFolder tree" in line, line
    assert not out.exists()


def test_torch_and_hfds_names_that_cannot_load_are_one_line(tmp_path, capsys, monkeypatch):
    line = _cli_error(capsys, "--dataset", "torch/cifar11", "--data-dir", str(tmp_path / "tv"), "--check")
    assert "no torchvision dataset cifar11" in line and "torch/cifar10," in line, line  # was an AssertionError
    with pytest.raises(DataError) as excinfo:  # torchvision cannot download ImageNet: no --dataset-download hint
        create_dataset(name="torch/imagenet", root=tmp_path, split="train", is_training=True)
    assert "ILSVRC2012" in _one_line(excinfo) and "--dataset-download" not in _one_line(excinfo)
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="torch/folder", root=tmp_path / "nosuch", split="train", is_training=True)
    assert "nosuch" in _one_line(excinfo)  # was a FileNotFoundError traceback
    line = _cli_error(capsys, "--dataset", "torch/cifar10", "--dataset-download", "--check")  # --data-dir embedded
    assert "reads --data-dir as its download or cache folder" in line, line  # not into the embedded extraction
    monkeypatch.setitem(sys.modules, "datasets", None)  # Hugging Face's package absent, wherever it is installed
    line = _cli_error(capsys, "--dataset", "hfds/timm/mini-imagenet", "--data-dir", str(tmp_path), "--check")
    assert "needs Hugging Face's datasets package" in line and "-m pip install datasets" in line, line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--std", "0", "0", "0"], "--std 0.0 0.0 0.0 is invalid: must be > 0"),  # ZeroDivisionError
        (["--aug", "imagenet", "--crop-pct", "-1"], "--crop-pct -1.0 is invalid"),  # failed at the first evaluation
        (["--img-size", "-5"], "--img-size -5 is invalid"),
        (["--seed", str(2**63)], "is invalid: must be between -2**62 and 2**62"),  # overflowed in the loader
        (["--decay-rate", "-1"], "--decay-rate=-1.0 is invalid: must be >= 0"),  # trained on at a negative LR
        (["--clip-grad", "-1"], "--clip-grad=-1.0 is invalid"),  # trained with the gradients turned round
        (["--decay-milestones", "2", "1"], "--decay-milestones 2 1 is invalid: epochs in ascending order"),  # not R
        (["--aug", "imagenet", "--aa", "rand_m9"], "timm's transform cannot take --aa rand_m9 (AssertionError)"),
        (["--aug", "imagenet", "--train-interpolation", "cubic"], "cannot take --train-interpolation cubic (KeyError"),
        (["--opt", "adamx"], "--opt adamx is not a timm optimizer; e.g. --opt adamax"),
        (["--opt", "fusedadam"], "(AssertionError: CUDA required for APEX optimizers)"),
        (["--opt", "adamw", "--opt-betas", "0.9"], "--opt-betas takes 2 values (3 for adan), not 1"),  # IndexError
    ],
)
def test_values_that_failed_later_or_silently_are_one_line_in_check(tmp_path, cifar_tiny, capsys, flags, words):
    """Each was a traceback (in --check or at the first step) or, for the decay rate and clip, a run that trained
    on silently wrong; now one line and exit 2 from --check, which the run itself repeats."""
    base = ["--data-dir", str(cifar_tiny), "--epochs", "3", "--dap-warmup", "1", "--output", str(tmp_path / "r")]
    line = _cli_error(capsys, *base, *flags, "--check")
    assert words in line, line


def test_a_failed_torchvision_download_does_not_ask_for_the_flag_given(tmp_path, monkeypatch):
    def offline(name, **kwargs):
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(timm.data, "create_dataset", offline)
    for extra, words in (({"download": True}, "the download failed: check this machine's network access"),
                         ({}, "pass --dataset-download to fetch it there")):  # fmt: skip
        with pytest.raises(DataError) as excinfo:
            create_dataset(name="torch/cifar10", root=tmp_path, split="train", is_training=True, **extra)
        assert words in _one_line(excinfo)


def test_images_not_one_folder_below_the_split_are_refused(tmp_path, cifar_tiny, capsys):
    """timm labels an image by the folder that holds it: Tiny-ImageNet's train/<class>/images/ made every class one
    class 'images' (with --val-split '' silently, exit 0), a class's sub/ folder a class of its own, and images in
    train/ itself a class named ''. Each is one line naming the folder and the fix, before the run folder."""
    root = _tree(cifar_tiny, tmp_path / "tiny", {"train": CLASSES})
    for cls in CLASSES[:2]:  # Tiny-ImageNet's layout for two of the three classes
        (root / "train" / cls / "images").mkdir()
        for f in (root / "train" / cls).glob("*.jpg"):
            f.rename(root / "train" / cls / "images" / f.name)
    out = tmp_path / "run"
    line = _cli_error(capsys, "--data-dir", str(root), "--val-split", "", "--output", str(out))
    assert f"images in {root / 'train' / 'airplane' / 'images'} would be labelled 'images'" in line, line
    _tree(cifar_tiny, tmp_path / "good", {"train": CLASSES})  # reached through '..': still one folder below
    assert len(create_dataset(name="", root=tmp_path / "tiny" / ".." / "good", split="train", is_training=True)) == 9
    assert f"move them up into {root / 'train' / 'airplane'}/" in line and not out.exists()
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for f in sorted((cifar_tiny / "train" / "bird").iterdir())[:3]:
        os.link(f, flat / f.name)
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=flat.parent, split="train", is_training=True)
    assert "holds images itself" in _one_line(excinfo) and f"{flat}/<class>/" in _one_line(excinfo)


def test_folders_timm_reads_no_images_from_say_why(tmp_path, cifar_tiny, monkeypatch):
    """A class of WebP images was 'has no images ... remove the folder' (timm reads .png/.jpg/.jpeg only), and an
    unreadable folder the same or a PermissionError traceback: each now names the real cause."""
    root = _tree(cifar_tiny, tmp_path / "data", {"train": CLASSES})
    for f in (root / "train" / "bird").iterdir():  # real images, re-encoded as WebP
        Image.open(f).save(f.with_suffix(".webp"))
        f.unlink()
    with pytest.raises(DataError) as excinfo:
        create_dataset(name="", root=root, split="train", is_training=True)
    assert f"{root / 'train' / 'bird'} holds 3 .webp files, but timm reads only .jpeg, .jpg, .png" in _one_line(excinfo)
    for f in (root / "train" / "bird").iterdir():
        f.unlink()
    (root / "train" / "bird" / "README.txt").write_text("not an image format: the message it had")
    with pytest.raises(DataError, match="has no images, so every later class would get a shifted label"):
        create_dataset(name="", root=root, split="train", is_training=True)
    real_access = os.access
    for denied in (root / "train" / "bird", root):  # as root, chmod 000 denies nothing: os.access stands in
        monkeypatch.setattr(os, "access", lambda p, mode, d=denied: Path(p) != d and real_access(p, mode))
        with pytest.raises(DataError) as excinfo:
            create_dataset(name="", root=root, split="train", is_training=True)
        assert (
            _one_line(excinfo) == f"{denied} cannot be read (permission denied); ask for read access, or copy the data"
        )


def _small_tree(src: Path, root: Path) -> Path:
    for split in ("train", "val"):
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir())[:2]:
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:4]:
                os.link(f, root / split / cls.name / f.name)
    return root


def test_an_output_inside_a_split_folder_is_refused(tmp_path, cifar_tiny, capsys):
    """--output inside train/ (or val/): the run's folder became a class folder of the data it trains on (the
    check said "class folder .../run has no images", which named no fix for the real mistake; a run that got past
    it would add its plots as a class's images). Outside the splits, inside --data-dir, is fine."""
    data = _small_tree(cifar_tiny, tmp_path / "data")
    before = sorted(str(p.relative_to(data)) for p in data.rglob("*"))
    flags = ["--data-dir", str(data), "--model", "cifar_resnet20", "--epochs", "1", "--dap-select", "none"]
    for out, split in ((data / "train" / "run", "train"), (data / "val" / "runs" / "a", "val")):
        line = _cli_error(capsys, *flags, "--output", str(out), "--check", "1")
        assert line.endswith(
            f"--output {out} is inside {data / split}, whose folders the trainer reads as classes: the run's folder "
            f"would be read as one; pass an --output outside {data}"
        ), line
    assert sorted(str(p.relative_to(data)) for p in data.rglob("*")) == before  # nothing written
    assert train_cli([*flags, "--output", str(data / "runs" / "a"), "--check", "1"]) == 0
