"""Run-folder faults (issue 11, items 1, 2, 4, 6): one owner per folder, resume/overwrite that lose nothing,
best checkpoints and temp files that survive kills and full disks, checkpoints that do not fit."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dap_pretrain.checkpoint import StorageError, save_checkpoint, write_atomic
from dap_pretrain.errors import UsageError
from dap_pretrain.logs import main_process_logging
from dap_pretrain.run_folder import check_output_dir
from dap_pretrain.run_folder import claim_output as _claim_output
from dap_pretrain.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
# One epoch on all data: a finished run in a few seconds.
FLAGS = ["--model", "cifar_resnet20", "-b", "64", "--workers", "1", "--lr", "0.05", "--epochs", "1"]
FLAGS += ["--dap-select", "none", "--no-plot"]


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dap_pretrain.train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )


def _one_line_error(res, *words) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar_tiny) -> Path:
    """A finished one-epoch run (read-only for the tests: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_main([*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(out)])
    return out


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def test_overwrite_that_fails_before_its_first_checkpoint_gives_the_old_run_back(
    tmp_path, finished, cifar_tiny, monkeypatch
):
    """--overwrite set the old run aside once the checks passed; a new run that fails before its first checkpoint
    (here: an error in epoch 1; an out-of-memory would do the same) had already deleted it, so neither run was left.
    The old run now comes back byte for byte. An attempt killed outright (nothing can put the files back) leaves them
    in .replaced/: the next --overwrite keeps that run aside, deletes the killed attempt's files, and drops the old
    run once its own first checkpoint is saved."""
    from dap_pretrain import runner

    other = _copy(finished, tmp_path / "other")
    (other / "export").mkdir()
    (other / "export" / "model.safetensors").write_bytes(b"old export")
    before = _files(other)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a stand-in)")

    monkeypatch.setattr(runner, "train_one_epoch", out_of_memory)
    flags = [*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(other), "--overwrite"]
    with pytest.raises(RuntimeError, match="stand-in"):
        train_main(flags)
    after = _files(other)
    after.pop(".lock"), before.pop(".lock")  # the lock file names its last owner: this attempt
    assert after == before and not (other / ".replaced").exists()
    monkeypatch.undo()

    (other / ".replaced").mkdir()  # a killed attempt: the old run aside, the attempt's files in its place
    for name in ("run.json", "summary.csv", "last.pth.tar", "log.txt", "args.yaml"):
        os.replace(other / name, other / ".replaced" / name)
    (other / "args.yaml").write_text("the killed attempt's\n")
    (other / "log.txt").write_text("the killed attempt's\n")
    with pytest.raises(UsageError, match=r"killed before its first checkpoint; the run it was replacing is kept in "):
        check_output_dir(other, resume="", overwrite=False)  # not "no last.pth.tar": the old run is not lost
    train_main(flags)
    assert not (other / ".replaced").exists() and "the killed attempt's" not in (other / "log.txt").read_text()
    assert json.loads((other / "run.json").read_text())["epochs"] == 1


def test_second_trainer_on_an_owned_folder_exits_2_and_touches_nothing(tmp_path, cifar_tiny):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from dap_pretrain.run_folder import "
         "claim_output, take_over; out = Path(sys.argv[1]); lock = claim_output(out, resume='', overwrite=False); "
         "take_over(lock, out, overwrite=False); print('held', flush=True); time.sleep(300)", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "log.txt").write_text("the first trainer's log\n")
        before = _files(out)
        res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(out))
        _one_line_error(res, str(out), "in use by another trainer", f"pid {holder.pid}")
        assert _files(out) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left no stale lock: the folder can be owned again at once
    _claim_output(out, resume="", overwrite=True).close()


def test_resumed_finished_run_keeps_its_top1(tmp_path, finished, cifar_tiny):
    first = json.loads((finished / "run.json").read_text())
    assert first["top1"] is not None
    run = _copy(finished, tmp_path / "run")
    (run / "run.json").unlink()  # as if killed while plotting, after the last checkpoint
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(run), "--resume", str(run / "last.pth.tar"))
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads((run / "run.json").read_text())
    assert (again["top1"], again["top5"]) == (first["top1"], first["top5"])
    assert "no --val-split" not in res.stdout


def test_resume_into_another_run_is_refused_and_overwrite_clears_only_after_checks(tmp_path, finished, cifar_tiny):
    other = _copy(finished, tmp_path / "other")
    (other / "model_best.pth.tar").write_bytes(b"old best")
    (other / "dap_schedule.png").write_bytes(b"old plot")
    (other / "export").mkdir()
    (other / "export" / "model.safetensors").write_bytes(b"old export")
    (other / "log.txt").write_text("OLD RUN LOG\n")
    before = _files(other)
    resume = ["--resume", str(finished / "last.pth.tar")]
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(other), *resume)
    _one_line_error(res, str(other), "holds another run", "--overwrite")
    # resuming a folder's own run with --overwrite would delete it
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(other), "--overwrite", "--resume",
               str(other / "last.pth.tar"))  # fmt: skip
    _one_line_error(res, "--overwrite", "drop --overwrite")
    # --overwrite with bad data: refused before anything of the old run is removed
    res = _cli(*FLAGS, "--data-dir", str(tmp_path / "nope"), "--output", str(other), "--overwrite")
    _one_line_error(res, "does not exist")
    assert _files(other) == before
    # --overwrite that passes its checks replaces the old run completely
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(other), "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OLD RUN LOG" not in (other / "log.txt").read_text()
    assert (other / "model_best.pth.tar").read_bytes() != b"old best"
    assert not (other / "dap_schedule.png").exists() and not (other / "export").exists()
    assert not (other / ".replaced").exists()  # the old run was set aside only until the first checkpoint
    assert torch.load(other / "model_best.pth.tar", weights_only=True)["epoch"] == 1
    # resuming into an empty folder is allowed and reports the resumed run's top-1
    empty = tmp_path / "empty"
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(empty), *resume)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        json.loads((empty / "run.json").read_text())["top1"] == json.loads((finished / "run.json").read_text())["top1"]
    )


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path, finished, cifar_tiny):
    ckpt = torch.load(finished / "last.pth.tar", weights_only=True)
    base = [*FLAGS, "--data-dir", str(cifar_tiny)]
    last = str(finished / "last.pth.tar")
    res = _cli(*base, "--output", str(tmp_path / "a"), "--num-classes", "12", "--resume", last)
    _one_line_error(res, "10 classes", "has 12", "--num-classes 10")
    no_opt = tmp_path / "no_opt.pth.tar"
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, no_opt)
    _one_line_error(_cli(*base, "--output", str(tmp_path / "b"), "--resume", str(no_opt)), "no optimizer")
    no_count = tmp_path / "no_count.pth.tar"  # an older checkpoint without num_classes: the shape error, one line
    torch.save({k: v for k, v in ckpt.items() if k != "num_classes"}, no_count)
    res = _cli(*base, "--output", str(tmp_path / "c"), "--num-classes", "12", "--resume", str(no_count))
    _one_line_error(res, "does not fit", "--num-classes")


def test_resume_rewrites_a_best_checkpoint_lost_to_a_kill_and_clears_temp_files(tmp_path, finished, cifar_tiny):
    run = _copy(finished, tmp_path / "run")
    (run / "model_best.pth.tar").unlink()  # killed during its first write: an empty temp file instead
    (run / f".model_best.pth.tar.tmp{os.getpid()}").write_bytes(b"")
    (run / ".summary.csv.tmp").write_bytes(b"epo")
    res = _cli(*FLAGS, "--data-dir", str(cifar_tiny), "--output", str(run), "--resume", str(run / "last.pth.tar"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.load(run / "model_best.pth.tar", weights_only=True)["epoch"] == 1
    assert not list(run.glob(".*.tmp*"))


def test_failed_checkpoint_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def disk_full(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "last.pth.tar").write_bytes(b"the previous epoch's checkpoint")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(StorageError) as e:  # (5) disk full mid-run: one line naming the file, exit 2 at the entry
        save_checkpoint({"state_dict": {}}, tmp_path / "last.pth.tar")
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "last.pth.tar" in message
    assert f"continue from {tmp_path / 'last.pth.tar'} (--resume)" in message
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]
    assert (tmp_path / "last.pth.tar").read_bytes() == b"the previous epoch's checkpoint"
    # before the first checkpoint there is nothing to resume: the advice is to start again
    (tmp_path / "last.pth.tar").unlink()
    with pytest.raises(StorageError) as e:
        write_atomic(tmp_path / "summary.csv", lambda tmp: disk_full(None, tmp))
    assert "--resume" not in str(e.value) and "--overwrite (it wrote no checkpoint yet)" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_log_file_that_cannot_be_written_is_one_line_and_the_run_logs_on(tmp_path, capsys):
    """(5) disk full mid-run, for the log: /dev/full fails every write with ENOSPC, as a full disk does."""
    (tmp_path / "log.txt").symlink_to("/dev/full")
    root, level = logging.getLogger(), logging.getLogger().level
    main_process_logging(0, tmp_path)
    try:
        for k in range(3):
            logging.getLogger("dap_pretrain.test").info("record %d", k)
    finally:
        for handler in [h for h in root.handlers if getattr(h, "dap_thread", None) == threading.get_ident()]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "log.txt" in lines[0] and "No space left on device" in lines[0], err
    assert all(f"record {k}" in out for k in range(3)), out  # stdout keeps every record


def test_resuming_at_another_process_count_warns_only_when_epochs_are_left(tmp_path, cifar_tiny, ctrl_c_in_epoch):
    """A checkpoint of 2 processes resumed by 1: the global batch and the augmentation change, said once. A finished
    run only writes its results again, and was warned all the same."""
    ctrl_c_in_epoch(2)
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_tiny), "--model", "test_resnet", "--img-size", "32", "-b", "100", "-j", "0",
             "--epochs", "2", "--dap-warmup", "1", "--no-plot", "--device", "cpu", "--output", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train_main(flags)
    warning = "checkpoint was written by 2 processes, this run has 1"
    said = []
    for _ in ("epoch 2 left", "finished"):
        ckpt = torch.load(out / "last.pth.tar", weights_only=False)
        ckpt["rng"] = [ckpt["rng"][0]] * 2  # as two processes write it
        torch.save(ckpt, out / "last.pth.tar")
        before = len((out / "log.txt").read_text())
        train_main([*flags, "--resume", str(out / "last.pth.tar")])
        said.append((out / "log.txt").read_text()[before:])
    assert warning in said[0] and "nothing left to train" not in said[0]
    assert warning not in said[1] and "nothing left to train" in said[1]


def test_claim_output_refuses_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="cannot use"):
        _claim_output(f / "run", resume="", overwrite=False)


def test_a_finished_run_resumed_into_another_folder_leaves_a_whole_run_there(tmp_path, finished, cifar_tiny):
    """--resume A/last.pth.tar --output B of a finished run wrote run.json and model_best into B but no
    last.pth.tar and no summary.csv: B could be neither resumed nor compared, and --export failed. B now holds the
    checkpoint it continued from and the history so far, and resumes as its own run."""
    run = _copy(finished, tmp_path / "a")
    moved = tmp_path / "b"
    base = [*FLAGS, "--data-dir", str(cifar_tiny)]
    train_main([*base, "--resume", str(run / "last.pth.tar"), "--output", str(moved), "--export"])
    assert (moved / "summary.csv").read_text() == (run / "summary.csv").read_text()
    assert (moved / "last.pth.tar").read_bytes() == (run / "last.pth.tar").read_bytes()
    # the best checkpoint too (before: not copied, and the log said its weights were gone when not the last epoch's)
    assert (moved / "model_best.pth.tar").read_bytes() == (run / "model_best.pth.tar").read_bytes()
    assert f"copied {run / 'model_best.pth.tar'} (the best epoch, 1)" in (moved / "log.txt").read_text()
    assert (moved / "export" / "meta.json").is_file()
    again = train_main([*base, "--resume", str(moved / "last.pth.tar")])
    assert again["top1"] == json.loads((run / "run.json").read_text())["top1"]
    assert "the run is finished: nothing left to train" in (moved / "log.txt").read_text()
    # into a folder holding another run, with --overwrite: the copy is the run's first checkpoint, so the replaced
    # run's files go (before, .replaced/ stayed, and a later --overwrite stopped early put that stale run back)
    other = _copy(finished, tmp_path / "other")
    train_main([*base, "--resume", str(run / "last.pth.tar"), "--output", str(other), "--overwrite"])
    assert (
        not (other / ".replaced").exists() and (other / "summary.csv").read_text() == (run / "summary.csv").read_text()
    )


def test_a_lock_file_removed_before_it_was_locked_is_claimed_again(tmp_path, monkeypatch):
    """A start that stops removes the lock file it made. If that happens between another start's open and its
    flock, the second held a lock on an unlinked file (and a third start could lock the new one): it now claims
    again, and holds the file at OUTPUT/.lock."""
    import fcntl

    from dap_pretrain import run_folder

    out = tmp_path / "run"
    real_flock, calls = fcntl.flock, []

    def flock_after_the_other_start_left(f, op):
        calls.append(op)
        if len(calls) == 1:
            (out / ".lock").unlink()  # what release_unused of the other start does
        return real_flock(f, op)

    monkeypatch.setattr(run_folder.fcntl, "flock", flock_after_the_other_start_left)
    lock = _claim_output(out, resume="", overwrite=False)
    try:
        assert len(calls) == 2 and os.fstat(lock.fileno()).st_ino == os.stat(out / ".lock").st_ino
    finally:
        lock.close()
