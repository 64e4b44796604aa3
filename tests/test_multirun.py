"""Runs sharing a process (dap_pretrain.multirun) train exactly as they do alone, and keep separate logs."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from dap_pretrain.multirun import NOT_STARTED, run_many
from dap_pretrain.multirun import main as multirun_main
from dap_pretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
FLAGS = "--model cifar_resnet20 -b 64 -j 0 --lr 0.05 --epochs 3 --decay-milestones 3 --dap-warmup 1 --dap-interval 1 "
FLAGS += "--dap-keep 0.5 --no-plot --in-memory on --device cpu"


def _rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open() as f:
        return [
            {k: r[k] for k in ("train_loss", "subset_size", "subset_digest", "eval_top1")} for r in csv.DictReader(f)
        ]


def test_threads_match_solo_runs_and_logs_stay_apart(tmp_path, cifar_tiny):
    runs = {
        "dap": f"{FLAGS} --data-dir {cifar_tiny} --seed 1",
        "all": f"{FLAGS} --data-dir {cifar_tiny} --seed 2 --dap-select none",
    }
    for name, flags in runs.items():
        train_main([*shlex.split(flags), "--output", str(tmp_path / "solo" / name)])
    code = multirun_main(sum((["--run", f"{f} --output {tmp_path / 'multi' / n}"] for n, f in runs.items()), []))
    assert code == 0
    for name in runs:
        assert _rows(tmp_path / "multi" / name) == _rows(tmp_path / "solo" / name), name
    assert [r["subset_size"] for r in _rows(tmp_path / "multi" / "dap")] == ["400", "400", "200"]
    dap_log = (tmp_path / "multi" / "dap" / "log.txt").read_text()
    all_log = (tmp_path / "multi" / "all" / "log.txt").read_text()
    assert "drop -> next 200" in dap_log and "next 200" not in all_log
    assert "drop (none dropped) -> next 400" in all_log  # the all-data run's drop epoch says it kept everything
    assert dap_log.count("epoch 1/3") == 1 and all_log.count("epoch 1/3") == 1


def test_a_failing_run_does_not_stop_the_other(tmp_path, cifar_tiny):
    good, bad = tmp_path / "good", tmp_path / "bad"
    cmd = [
        sys.executable,
        "-m",
        "dap_pretrain.multirun",
        "--run",
        f"{FLAGS} --epochs 2 --data-dir {cifar_tiny} --output {good}",
        "--run",
        f"{FLAGS} --data-dir {cifar_tiny} --output {bad} --model no_such_net",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert (good / "run.json").is_file() and not (bad / "run.json").exists()
    assert f"error: {bad}: unknown model 'no_such_net'" in proc.stderr
    same = subprocess.run(
        [sys.executable, "-m", "dap_pretrain.multirun", "--run", f"--output {good}", "--run", f"--output {good}"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert same.returncode == 2 and "its own --output" in same.stderr
    for bad, message in ((["--jobs", "0"], "--jobs 0: at least one"), (["--status", "/no/s.json"], "--status")):
        proc = subprocess.run(
            [sys.executable, "-m", "dap_pretrain.multirun", "--run", f"--output {good}", *bad],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_jobs_queue_runs_and_start_until_leaves_the_rest(tmp_path, cifar_tiny):
    flags = f"{FLAGS} --epochs 2 --decay-milestones 2 --data-dir {cifar_tiny}"
    argvs = [[*shlex.split(flags), "--seed", str(k), "--output", str(tmp_path / f"r{k}")] for k in range(3)]
    status = tmp_path / "status.json"
    results = run_many(argvs, jobs=2, status=str(status))
    assert all(isinstance(r, dict) for r in results), results
    runs = json.loads(status.read_text())
    assert [runs[str(tmp_path / f"r{k}")]["state"] for k in range(3)] == ["finished"] * 3
    spans = [(runs[str(tmp_path / f"r{k}")]["started"], runs[str(tmp_path / f"r{k}")]["ended"]) for k in range(3)]
    # the third run waited for a slot: it started after one of the first two ended, and never were three running
    assert spans[2][0] >= min(spans[0][1], spans[1][1])
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2

    late = [[*a[:-1], str(tmp_path / f"late{k}"), "--epochs", "6"] for k, a in enumerate(argvs[:2])]
    results = run_many(late, jobs=1, start_until=time.time() + 0.2, status=str(status))
    assert isinstance(results[0], dict) and results[1] is NOT_STARTED  # six epochs take longer than 0.2 s
    runs = json.loads(status.read_text())
    assert runs[str(tmp_path / "late1")] == {"state": "not started", "started": None, "ended": None, "error": None}
    assert not (tmp_path / "late1").exists()


def test_a_status_file_that_cannot_be_written_warns_once_and_the_runs_go_on(tmp_path, capsys):
    from dap_pretrain.multirun import _Status

    (tmp_path / "file").write_text("")
    board = _Status(["a"], str(tmp_path / "file" / "status.json"))  # its folder is a file: every write fails
    board.set("a", state="running")
    board.set("a", state="finished")
    assert board.runs["a"]["state"] == "finished" and board.path is None
    err = capsys.readouterr().err
    assert err.count("warning: cannot write --status") == 1 and len(err.splitlines()) == 1, err


def test_a_bug_in_one_run_is_reported_with_its_message_and_the_other_finishes(tmp_path, monkeypatch, capsys):
    from dap_pretrain import multirun

    def fake(argv):
        if "bad" in argv[-1]:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
        return {"top1": 1.0}

    monkeypatch.setattr(multirun, "train_main", fake)
    status = tmp_path / "s.json"
    results = run_many([["--output", "good"], ["--output", "bad"]], jobs=1, status=str(status))
    assert results[0] == {"top1": 1.0} and isinstance(results[1], RuntimeError)
    entry = json.loads(status.read_text())["bad"]
    assert entry["state"] == "failed"
    assert entry["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB (traceback above)"
    err = capsys.readouterr().err
    assert "Traceback" in err and f"error: bad: {entry['error']}\n" in err


def test_the_data_path_never_draws_from_the_global_rng(cifar_tiny, imagenet_tiny):
    """Runs sharing a process share torch's global generator: a loader that drew from it (a DataLoader's base seed)
    while another run seeded and built its model changed that model's initial weights. Ours draw from their own."""
    from dap_pretrain.data.dataset import IndexedDataset, create_dataset
    from dap_pretrain.data.gpu_decode import GpuDecodeLoader
    from dap_pretrain.data.loader import cifar_transform, create_loader
    from dap_pretrain.data.memory import _decode

    ds = IndexedDataset(create_dataset(name="", root=cifar_tiny, split="val", is_training=False))
    ds.transform = cifar_transform(img_size=32, is_training=True)  # random crop + flip, seeded per sample
    files = sorted(str(p) for p in (imagenet_tiny / "train").glob("*/*"))
    cpu, norm = torch.device("cpu"), dict(mean=(0.5,) * 3, std=(0.5,) * 3)

    def passes():
        yield lambda: _decode(ds, img_size=32, num_workers=0, batch_size=50)
        for workers in (0, 1):
            loader = create_loader(ds, batch_size=50, sampler=range(100), **norm, device=cpu, num_workers=workers,
                                   seed=3)  # fmt: skip
            yield lambda loader=loader: [b for b in loader]
        gpu = GpuDecodeLoader([(f, 0) for f in files], sampler=range(len(files)), batch_size=4, img_size=32,
                              **norm, device=cpu, num_workers=0)  # fmt: skip
        yield lambda: [b for b in gpu]

    for one_pass in passes():
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        one_pass()
        assert torch.equal(torch.rand(4), expected), one_pass
