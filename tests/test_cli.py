"""``python -m dap_pretrain plan``: output, JSON, target compute, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dap_pretrain.cli import main
from dap_pretrain.errors import UsageError


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dap_pretrain", *args], capture_output=True, text=True)


def test_plan_imagenet_preset_prints_74_and_86():
    out = _run("plan", "--preset", "imagenet")
    assert out.returncode == 0 and "compute fraction: 0.7391" in out.stdout
    assert len([ln for ln in out.stdout.splitlines() if ln.strip()[:1].isdigit()]) == 120
    flags = [
        "--epochs",
        "120",
        "--dap-warmup",
        "10",
        "--dap-interval",
        "2",
        "--dap-keep",
        "0.95",
        "--dap-active",
        "10",
        "--dap-reuse",
        "30",
        "60",
        "90",
        "--json",
    ]
    data = json.loads(_run("plan", *flags).stdout)
    assert abs(data["compute_fraction"] - 0.86) < 0.005 and len(data["subset_sizes"]) == 120
    assert data["subset_sizes"][0] == 1_281_167


def test_plan_target_compute():
    data = json.loads(_run("plan", "--preset", "imagenet", "--dap-target-compute", "0.8", "--json").stdout)
    assert abs(data["compute_fraction"] - 0.8) < 1e-3 and 0.9 < data["dap"]["keep"] < 0.95


@pytest.mark.parametrize(
    "args,name",
    [
        (["--dap-keep", "0"], "dap-keep"),
        (["--dap-keep", "1.01"], "dap-keep"),
        (["--dap-interval", "0"], "dap-interval"),
        (["--dap-warmup", "-1"], "dap-warmup"),
        (["--dap-warmup", "120"], "dap-warmup"),
        (["--dap-active", "0"], "dap-active"),
        (["--dap-reuse", "60", "30"], "dap-reuse"),
        (["--dap-reuse", "30", "30"], "dap-reuse"),
        (["--dap-reuse", "0"], "dap-reuse"),
        (["--dap-reuse", "121"], "dap-reuse"),
        (["--num-samples", "0"], "num-samples"),
        (["--dap-target-compute", "0"], "target-compute"),
        (["--dap-target-compute", "1.5"], "target-compute"),
        (["--dap-keep", "abc"], "dap-keep"),
    ],
)
def test_plan_bad_input_one_line_exit_2(args, name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and name in err and err.startswith("error: ")


def test_a_misspelt_plan_flag_gets_the_nearest_one(capsys):
    """argparse reports a subcommand's leftover flags from the top parser, which knows none of plan's flags."""
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--preset", "imagenet", "--dap_keep", "0.9"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "did you mean --dap-keep for --dap_keep?" in err and err.count("\n") == 1, err


def test_bad_input_through_the_real_entry_point():
    out = _run("plan", "--dap-keep", "2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_the_command_line_imports_no_torch_for_a_plan_and_the_package_still_registers_the_networks():
    """``python -m dap_pretrain plan`` took 4-5 s on cpu-2, nearly all of it importing torch and timm for the
    package's own imports; a plan needs neither. ``import dap_pretrain`` still registers the CIFAR networks."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "dap_pretrain", "plan", "--epochs", "20"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "compute fraction:" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "dap_pretrain.cli" in imported and not imported & {"torch", "timm"}, sorted(imported)[:20]
    code = "import dap_pretrain, timm; print(timm.is_model('cifar_resnet110'), callable(dap_pretrain.load_backbone))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


@pytest.mark.parametrize(
    "orig_argv, cli",
    [
        ("python -m dap_pretrain plan", True),
        ("python -X importtime -W ignore -u -m dap_pretrain cache", True),
        ("python -mdap_pretrain plan", True),
        ("python -m dap_pretrain.train --model x", False),  # another module of the package: imports eagerly
        ("python script.py -m dap_pretrain", False),  # a script's own arguments
        ("python -c pass -m dap_pretrain", False),
    ],
)
def test_only_python_m_dap_pretrain_skips_the_eager_imports(monkeypatch, orig_argv, cli):
    import dap_pretrain

    monkeypatch.setattr(sys, "argv", ["-m"])  # as Python sets it while it finds the module of -m
    monkeypatch.setattr(sys, "orig_argv", orig_argv.split())
    assert dap_pretrain._running_the_cli() is cli
    monkeypatch.setattr(sys, "argv", ["/path/to/dap_pretrain/__main__.py"])  # once found: the package is imported
    assert dap_pretrain._running_the_cli() is False


ENTRY_POINTS = {"__main__.py", "cli.py", "train.py", "multirun.py", "mm/train.py"}


def test_library_modules_never_import_the_command_line():
    """Only entry points import dap_pretrain.cli / dap_pretrain.train (issue 11: the library takes keyword args)."""
    import ast
    from pathlib import Path

    import dap_pretrain

    root = Path(dap_pretrain.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n in ("dap_pretrain.cli", "dap_pretrain.train") for n in names):
                offenders.append(rel)
    assert not offenders, offenders


def test_entry_point_maps_expected_failures_only():
    """A DapError is one line and exit 2; any other exception (a real bug, a torch error) keeps its traceback."""
    import pytest

    from dap_pretrain.errors import UsageError, entry_point

    def boom(exc):
        return entry_point(lambda argv=None: (_ for _ in ()).throw(exc))

    with pytest.raises(SystemExit) as e:
        boom(UsageError("bad flag; pass another"))()
    assert e.value.code == 2
    with pytest.raises(ValueError, match="from torch"):
        boom(ValueError("from torch"))()


def test_entry_point_destroys_the_process_group_where_ranks_stop_together(tmp_path):
    """A DDP run that finished left gloo's process group to the interpreter's exit, which can abort the process
    (SIGABRT, "terminate called without an active exception") after a good run: CI saw torchrun report a finished
    2-process run as failed. A return or a DapError destroys it; Ctrl-C leaves it (a collective may be in flight)."""
    import torch.distributed as dist

    from dap_pretrain.errors import UsageError, entry_point

    def in_group(then):
        def fn(argv=None):
            store = dist.FileStore(str(tmp_path / f"store{len(list(tmp_path.iterdir()))}"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
            return then()

        return fn

    def refuse():
        raise UsageError("bad flag; pass another")

    def interrupt():
        raise KeyboardInterrupt

    try:
        assert entry_point(in_group(lambda: 0), exit=False)() == 0 and not dist.is_initialized()
        assert entry_point(in_group(refuse), exit=False)() == 2 and not dist.is_initialized()
        assert entry_point(in_group(interrupt), exit=False)() == 130 and dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_refusal_every_rank_shares_is_printed_once_per_node(monkeypatch, capsys):
    """Under torchrun a refusal that every process raises alike was one line per process (8 on an 8-GPU node). One
    marked on_every_rank is printed by local rank 0; the node's other processes wait for torchrun to stop them
    (exiting first could get local rank 0 stopped before it printed) and print it only if still running after the
    wait. Unmarked refusals, which may be one process's own, and marked ones outside torchrun print at once."""
    from dap_pretrain import errors
    from dap_pretrain.errors import UsageError, entry_point, on_every_rank

    class StoppedByTorchrun(BaseException):
        pass

    waited = []

    def sleep(seconds):
        waited.append(seconds)
        if stop:
            raise StoppedByTorchrun

    monkeypatch.setattr(errors.time, "sleep", sleep)

    def refuse(marked):
        def fn(argv=None):
            raise on_every_rank(UsageError("shared; fix it")) if marked else UsageError("own; fix it")

        return entry_point(fn, exit=False)

    for torchrun, local_rank, marked, stop, waits, printed in (
        (True, "0", True, True, 0, 1),
        (True, "1", True, True, 1, 0),  # stopped while it waits: local rank 0 said it
        (True, "1", True, False, 1, 1),  # not stopped: it says it itself
        (True, "1", False, True, 0, 1),
        (False, "1", True, True, 0, 1),
    ):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        if torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
        else:
            monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
        waited.clear()
        if stop and waits:
            with pytest.raises(StoppedByTorchrun):
                refuse(marked)()
        else:
            assert refuse(marked)() == 2
        case = (torchrun, local_rank, marked, stop)
        assert len(capsys.readouterr().err.splitlines()) == printed and waited == [errors.PEER_WAIT_S] * waits, case


def test_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Two DDP ranks refusing together must not interleave into ``error: ...error: ...``: each line, newline
    included, goes out in one write (``print`` makes two)."""
    from dap_pretrain.errors import UsageError, entry_point

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert entry_point(lambda argv=None: (_ for _ in ()).throw(UsageError("held; pass --overwrite")), exit=False)() == 2
    with pytest.raises(SystemExit):
        main(["plan", "--no-such-flag"])
    assert len(writes) == 2 and all(w.startswith("error: ") and w.count("\n") == 1 and w.endswith("\n") for w in writes)


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--epochs", "20", "--dap-warmup", "3", "--dap-interval", "1", "--decay-milestones", "10"],
        ["--epochs", "40", "--sched", "cosine"],
        ["--epochs", "30", "--decay-milestones", "10", "20", "--dap-reuse", "10"],
    ],
    ids=["defaults", "embedded-like", "cosine", "reuse-given"],
)
def test_plan_predicts_the_trainers_schedule(flags):
    """Without --dap-reuse the trainer picks data back up at its LR-decay epochs (--decay-milestones, default 30 60
    90, under --sched step); plan left R empty, so it printed 24.9% where the trainer's default run spends 58.9%."""
    from dap_pretrain import runner
    from dap_pretrain.train import parse_args, run_config

    cfg = run_config(parse_args([*flags, "--output", "o"]))
    _, acct, dap, _ = runner._build_sampler(cfg, 8000, 1, 0)  # the trainer's own schedule, as it builds it
    planned = json.loads(_run("plan", *flags, "--num-samples", "8000", "--json").stdout)
    assert planned["dap"] == {k: dap[k] for k in planned["dap"]} and planned["samples_trained"] == acct.planned


@pytest.mark.parametrize("command", ["plan", "train"])
def test_keep_and_target_compute_together_are_refused(command, capsys):
    """--dap-target-compute solves --dap-keep: given both, the keep was silently replaced."""
    from dap_pretrain.train import cli as train_cli

    flags = ["--dap-keep", "0.5", "--dap-target-compute", "0.8"]
    with pytest.raises(SystemExit) as exc:
        main(["plan", *flags]) if command == "plan" else train_cli([*flags, "--output", "o"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "give one of --dap-keep and --dap-target-compute" in err


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    """Ctrl-C printed Python's 70-line KeyboardInterrupt traceback of wherever the run was."""
    from dap_pretrain.errors import entry_point

    def interrupted(argv=None):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        entry_point(interrupted)()
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted; what was saved before it is kept\n"
    assert entry_point(interrupted, prog="report", exit=False)() == 130
    assert capsys.readouterr().err.startswith("report: interrupted")


def test_ctrl_c_in_a_run_names_the_resume_command(tmp_path, cifar_tiny, capsys, ctrl_c_in_epoch):
    """Ctrl-C in epoch 2 of a run: the one line says how to continue it (before: only that the saved files are
    kept); the folder is the run's, and --resume continues it to the end."""
    from dap_pretrain.train import cli as train_cli

    ctrl_c_in_epoch(2)
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_tiny), "--model", "test_resnet", "--img-size", "32", "-b", "100", "-j", "0",
             "--epochs", "3", "--dap-warmup", "1", "--no-plot", "--device", "cpu", "--output", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        train_cli(flags)
    err = capsys.readouterr().err
    assert (
        exc.value.code == 130
        and err == f"interrupted; continue the run: the same command with --resume {out / 'last.pth.tar'}\n"
    )
    assert train_cli([*flags, "--resume", str(out / "last.pth.tar")]) == 0 and (out / "run.json").is_file()
    # --overwrite stopped before its first checkpoint: the old run is put back, and no --resume of it is offered
    kept = (out / "last.pth.tar").read_bytes()
    ctrl_c_in_epoch(1)  # the new run's first epoch
    with pytest.raises(SystemExit):
        train_cli([*flags, "--overwrite"])
    assert capsys.readouterr().err == "interrupted; what was saved before it is kept\n"
    assert (out / "last.pth.tar").read_bytes() == kept and not (out / ".replaced").exists()


def test_an_entry_point_leaves_the_signal_handlers_as_it_found_them():
    """torch sets its SIGCHLD handler (which reports loader workers that die) once per process: an entry point
    that returns, or refuses, must leave it and SIGTERM's handler in place for the next run in the process."""
    from dap_pretrain.errors import entry_point

    def torch_sets_its_handler(*args):  # a DataLoader's first workers do, in the run
        return None

    def run(argv):
        signal.signal(signal.SIGCHLD, torch_sets_its_handler)
        return 0

    before = signal.getsignal(signal.SIGCHLD), signal.getsignal(signal.SIGTERM)
    try:
        assert entry_point(run, exit=False)() == 0
        assert signal.getsignal(signal.SIGCHLD) is torch_sets_its_handler  # was reset to what it was before
        assert signal.getsignal(signal.SIGTERM) == before[1]
    finally:
        signal.signal(signal.SIGCHLD, before[0])


def test_sigterm_stops_a_run_as_ctrl_c_does_with_exit_143(tmp_path, cifar_tiny):
    """A job scheduler's time limit (SIGTERM) killed the trainer at once: no line, exit 143, nothing cleaned up.
    Now it stops as Ctrl-C does: one line naming --resume, with the shell's code for SIGTERM (the resume itself is
    Ctrl-C's test's)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dap_pretrain.train", "--data-dir", str(cifar_tiny), "--model", "test_resnet",
           "--img-size", "32", "-b", "50", "-j", "0", "--epochs", "12", "--dap-warmup", "1", "--no-plot",
           "--device", "cpu", "--output", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "last.pth.tar").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert (
        err.splitlines()[-1]
        == f"terminated (SIGTERM); continue the run: the same command with --resume {out / 'last.pth.tar'}"
    )


def test_ctrl_c_in_the_compare_baseline_names_the_command_that_continues_both(
    tmp_path, cifar_tiny, capsys, ctrl_c_in_epoch
):
    """Ctrl-C in --compare's baseline named the baseline's own --resume, which is refused (its --dap-select is
    none); the line now names --compare --resume of the DaP run, and that command finishes both."""
    from dap_pretrain.train import cli as train_cli

    ctrl_c_in_epoch(4)  # the DaP run's 2 epochs, then the baseline's second
    out = tmp_path / "run"
    flags = ["--data-dir", str(cifar_tiny), "--model", "test_resnet", "--img-size", "32", "-b", "100", "-j", "0",
             "--epochs", "2", "--dap-warmup", "1", "--no-plot", "--device", "cpu", "--output", str(out),
             "--compare"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        train_cli(flags)
    last = out / "last.pth.tar"
    assert exc.value.code == 130
    assert capsys.readouterr().err == f"interrupted; continue both runs with --compare --resume {last}\n"
    assert train_cli([*flags, "--resume", str(last)]) == 0 and "DaP top-1" in capsys.readouterr().out


def test_a_short_run_with_the_default_warmup_is_told_the_default(capsys):
    """`--epochs 2` alone said "dap-warmup=10 is invalid: must be an integer in [0, 1]", a value never typed."""
    with pytest.raises(SystemExit):
        main(["plan", "--epochs", "5"])
    err = capsys.readouterr().err.strip()
    assert "--dap-warmup 10 is not below --epochs 5" in err and "(default 10)" in err and "\n" not in err


@pytest.mark.parametrize("select", ["none", "infobatch"])
def test_policies_without_dap_warmup_take_a_short_run(select):
    """InfoBatch prunes from epoch 1 and uses no --dap-* flag: `--epochs 4` was refused for --dap-warmup 10."""
    from dap_pretrain.train import parse_args, run_config

    cfg = run_config(parse_args(["--dap-select", select, "--epochs", "4"]))
    assert cfg.dap_warmup == 3
    with pytest.raises(UsageError, match="--dap-warmup 10 is not below --epochs 4"):
        run_config(parse_args(["--dap-select", "random", "--epochs", "4"]))
