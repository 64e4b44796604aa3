"""benchmarks/paper_tables.py: its bookkeeping on fake runs and small files, and one ``--dry-run`` end to end.

Most tests drive :class:`paper_tables.Sweep` with a stand-in trainer (a few lines of Python that log their argv and
either write ``run.json`` at once or hang until killed), so the budget, resume and CSV paths run in milliseconds.
"""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import paper_tables as pt  # noqa: E402
from common import BenchmarkError  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar10"

FAKE_TRAINER = """
import json, os, signal, sys, time
from pathlib import Path
argv = sys.argv[1:]
out = Path(argv[argv.index("--output") + 1])
with (out / "argv.jsonl").open("a") as f:
    f.write(json.dumps(argv) + "\\n")
if os.environ.get("FAKE_TRAINER") == "hang":
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
rows = "".join(f"{e},100,0.5\\n" for e in range(1, 4))
(out / "summary.csv").write_text("epoch,samples_trained,epoch_time_s\\n" + rows)
seed = int(argv[argv.index("--seed") + 1])
(out / "run.json").write_text(json.dumps({"epochs": 3, "top1": 50.0 + seed, "compute_fraction_measured": 0.5,
                                          "wall_time_s": 1.5, "git_commit": "0123456789abcdef"}))
"""


@pytest.fixture
def fake_trainer(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return (sys.executable, str(path))


def _runs(runs_dir: Path, rows=("all", "dap"), seeds=(0,), networks=("net_a",)):
    return pt.plan_runs(
        networks=networks, rows=rows, seeds=seeds, runs_dir=runs_dir, flags_for=lambda n, r, s: ["--seed", str(s)]
    )


def _sweep(runs, tmp_path, trainer, *, budget=60.0, jobs=2, margin=0.0, grace=0.5, together=False):
    t0 = time.monotonic()
    return pt.Sweep(
        runs,
        csv_path=tmp_path / "results.csv",
        device="cpu: test",
        deadline=t0 + budget,
        jobs=jobs,
        threads=1,
        t0=t0,
        trainer=trainer,
        start_margin=margin,
        grace=grace,
        together=together,
    )


def _argvs(run) -> list[list[str]]:
    path = run.out / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- flags and order ---------------------------------------------------------------------------------------


def test_row_flags():
    assert pt.row_flags("all", 0.6267) == ["--dap-select", "none"]
    assert pt.row_flags("dap", 0.6267) == ["--dap-select", "hard"]
    assert pt.row_flags("random", 0.6267) == ["--dap-select", "random"]
    assert pt.row_flags("fewer_epochs", 0.6267) == ["--epochs-scale", "0.626700"]
    assert pt.row_flags("fixed_subset", 0.6267) == ["--fixed-subset", "0.626700"]
    assert pt.row_flags("infobatch", 0.6267) == ["--dap-select", "infobatch", "--infobatch-target-compute", "0.626700"]


def test_trainer_flags_are_the_paper_config_plus_speed_flags():
    gpu = pt.trainer_flags(
        network="cifar_resnet20", row="dap", seed=2, data_root=Path("/d"), compute=0.6267, device="cuda"
    )
    assert gpu[:4] == ["--config", "configs/pretrain/cifar/cifar10_resnet110_dap63.yaml", "--model", "cifar_resnet20"]
    joined = " ".join(gpu)
    for part in (
        "--dataset  --data-dir /d --train-split train --val-split test",
        "--seed 2",
        "--in-memory on",
        "-vb 1000",
        "-j 4",
        "--amp --amp-dtype bfloat16",
        "--cuda-graph",
        "--channels-last",
    ):
        assert part in joined, part
    assert "--epochs" not in gpu  # the config's 300-epoch schedule, untouched
    assert gpu[-2:] == ["--dap-select", "hard"]
    cpu = pt.trainer_flags(
        network="test_resnet",
        row="all",
        seed=0,
        data_root=Path("/d"),
        compute=0.975,
        device="cpu",
        schedule=dict(epochs=4, warmup=1, interval=1, keep=0.9, reuse=2, milestones=[2, 3]),
    )
    assert "--cuda-graph" not in cpu and "--amp" not in cpu
    assert " ".join(cpu).count("--epochs 4 --sched step --decay-milestones 2 3") == 1
    assert pt.portable(cpu) == pt.portable([("/elsewhere" if f == "/d" else f) for f in cpu])


def test_runs_are_seed_major():
    runs = _runs(Path("/r"), rows=("all", "dap"), seeds=(0, 1), networks=("cifar_resnet20", "cifar_resnet110"))
    assert [r.key for r in runs][:5] == [
        ("cifar_resnet20", "all", 0),
        ("cifar_resnet20", "dap", 0),
        ("cifar_resnet110", "all", 0),
        ("cifar_resnet110", "dap", 0),
        ("cifar_resnet20", "all", 1),
    ]
    assert runs[0].out == Path("/r/cifar_resnet20/all/seed0")


# ---- CSV ---------------------------------------------------------------------------------------------------


def test_csv_append_columns_and_reread(tmp_path):
    path = tmp_path / "sub" / "t.csv"
    run = pt.Run("cifar_resnet20", "dap", 1, tmp_path, [])
    summary = dict(epochs=300, top1=91.234, compute_fraction_measured=0.62674, wall_time_s=123.45, git_commit="a" * 40)
    pt.append_csv(path, pt.csv_record(run, summary, "NVIDIA H100"))
    pt.append_csv(path, pt.csv_record(pt.Run("cifar_resnet20", "all", 1, tmp_path, []), summary, "NVIDIA H100"))
    lines = path.read_text().splitlines()
    assert lines[0] == "network,row,seed,epochs,top1,compute_measured,wall_s,device,commit"
    assert lines[1] == "cifar_resnet20,dap,1,300,91.23,0.626740,123.5,NVIDIA H100,aaaaaaaaaa"
    assert len(lines) == 3  # one header
    recs = pt.read_csv(path)
    assert recs[0]["seed"] == 1 and recs[0]["top1"] == 91.23 and recs[0]["epochs"] == 300
    (tmp_path / "bad.csv").write_text("network,row,seed\nx,all,0\n")
    with pytest.raises(BenchmarkError, match="pass another --csv"):
        pt.read_csv(tmp_path / "bad.csv")
    assert pt.read_csv(tmp_path / "missing.csv") == []


def test_finished_folder_is_appended_without_running_and_never_twice(tmp_path, fake_trainer):
    runs = _runs(tmp_path / "runs")
    done = runs[0].out
    done.mkdir(parents=True)
    (done / "run.json").write_text(
        json.dumps(dict(epochs=3, top1=40.0, compute_fraction_measured=1.0, wall_time_s=2.0, git_commit=None))
    )
    _sweep(runs, tmp_path, fake_trainer).run()
    assert _argvs(runs[0]) == [] and len(_argvs(runs[1])) == 1  # only the unfinished one ran
    assert [r.status for r in runs] == ["finished", "finished"]
    recs = pt.read_csv(tmp_path / "results.csv")
    assert [(r["row"], r["top1"], r["commit"]) for r in recs] == [("all", 40.0, "unknown"), ("dap", 50.0, "0123456789")]
    again = _runs(tmp_path / "runs")
    _sweep(again, tmp_path, fake_trainer).run()
    assert len(pt.read_csv(tmp_path / "results.csv")) == 2 and len(_argvs(runs[1])) == 1


# ---- budget and resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_term", [False, True])
def test_budget_stops_running_trainers(tmp_path, fake_trainer, monkeypatch, ignore_term):
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    if ignore_term:  # SIGTERM ignored: SIGKILL after the grace period
        monkeypatch.setenv("FAKE_IGNORE_TERM", "1")
    runs = _runs(tmp_path / "runs")
    t0 = time.monotonic()
    _sweep(runs, tmp_path, fake_trainer, budget=1.5, grace=0.5).run()
    assert time.monotonic() - t0 < 10
    assert [r.status for r in runs] == ["stopped", "stopped"]
    assert not (tmp_path / "results.csv").exists()


def test_no_run_starts_within_the_margin(tmp_path, fake_trainer):
    runs = _runs(tmp_path / "runs")
    _sweep(runs, tmp_path, fake_trainer, budget=10, margin=30).run()
    assert [r.status for r in runs] == ["not started"] * 2 and not any(_argvs(r) for r in runs)


def test_a_checkpoint_without_run_json_is_resumed(tmp_path, fake_trainer):
    import torch

    runs = _runs(tmp_path / "runs")
    runs[1].out.mkdir(parents=True)
    torch.save({"epoch": 2}, runs[1].out / "last.pth.tar")
    (runs[1].out / "flags.json").write_text(json.dumps(runs[1].flags))
    pt.check_resumable(runs)
    _sweep(runs, tmp_path, fake_trainer).run()
    fresh, resumed = _argvs(runs[0])[0], _argvs(runs[1])[0]
    assert "--overwrite" in fresh and "--resume" not in fresh
    assert resumed[resumed.index("--resume") + 1] == str(runs[1].out / "last.pth.tar") and "--overwrite" not in resumed
    summary = pt.job_summary(runs, sweep_s=2.0)
    by_row = {r["row"]: r for r in summary["runs"]}
    assert by_row["dap"]["epoch_start"] == 2 and by_row["dap"]["samples_job"] == 100  # epoch 3 only
    assert by_row["all"]["samples_job"] == 300 and by_row["all"]["img_per_s"] == 200.0
    assert summary["aggregate_img_per_s"] == 200.0 and summary["per_network"]["net_a"]["img_per_s"] == 200.0


def _together_runs(tmp_path, cifar_tiny, seeds, extra: dict) -> list:
    """cifar_resnet20 DaP runs on 400 tiny CIFAR images, 2 epochs unless ``extra[seed]`` adds other flags."""
    flags = "--model cifar_resnet20 -b 64 -j 0 --epochs 2 --decay-milestones 2 --dap-warmup 1 --dap-interval 1 "
    flags += f"--dap-keep 0.5 --no-plot --in-memory on --device cpu --data-dir {cifar_tiny}"
    return pt.plan_runs(
        networks=["cifar_resnet20"],
        rows=["dap"],
        seeds=seeds,
        runs_dir=tmp_path / "w" / "runs",
        flags_for=lambda n, r, s: [*flags.split(), "--seed", str(s), *extra.get(s, [])],
    )


@pytest.mark.slow
def test_together_keeps_jobs_runs_going_and_starts_none_after_the_margin(tmp_path, cifar_tiny):
    """--mode together: one real multirun process; a queued run starts when a slot frees, none within the margin."""
    first = _together_runs(tmp_path, cifar_tiny, [0, 1, 2], {0: ["--epochs", "6"]})
    _sweep(first, tmp_path, (), budget=300, jobs=2, together=True).run()
    assert [r.status for r in first] == ["finished"] * 3
    ends = [r.started_at + r.seconds for r in first[:2]]
    # seed 0 trains 6 epochs, seed 1 two: seed 2 waited for seed 1's slot, and took it while seed 0 still ran
    assert ends[1] - 0.1 <= first[2].started_at < ends[0]
    assert len(pt.read_csv(tmp_path / "results.csv")) == 3

    # The margin leaves 10 s from now to start runs in (the process's start-up included); seed 3's 60 epochs (about
    # 20 s on cpu-2) hold the one slot past that, so seed 4 is never started, and the process ends by itself before
    # the budget.
    later = _together_runs(tmp_path, cifar_tiny, [3, 4], {3: ["--epochs", "60"]})
    _sweep(later, tmp_path, (), budget=300, jobs=1, margin=290, together=True).run()
    assert [r.status for r in later] == ["finished", "not started"] and later[1].started_at is None
    assert later[0].seconds > 0 and later[0].started_at + later[0].seconds < time.time()
    assert len(pt.read_csv(tmp_path / "results.csv")) == 4 and not (later[1].out / "log.txt").exists()


@pytest.mark.slow
def test_together_tells_failed_from_stopped_and_not_started(tmp_path, cifar_tiny):
    """A run that fails while another trains is failed (with its one-line error) even when the budget then stops
    the process; the run training at the deadline is stopped; the one still queued was not started."""
    runs = _together_runs(tmp_path, cifar_tiny, [0, 1, 2], {0: ["--model", "no_such_net"], 1: ["--epochs", "500"]})
    t0 = time.monotonic()
    _sweep(runs, tmp_path, (), budget=25, jobs=1, together=True).run()
    assert time.monotonic() - t0 < 60
    assert [r.status for r in runs] == ["failed", "stopped", "not started"]
    assert "unknown model 'no_such_net'" in runs[0].error and len(runs[0].error) < 300  # the run's line only
    assert runs[1].seconds > 0 and runs[2].started_at is None
    assert not (tmp_path / "results.csv").exists()


def test_together_process_that_dies_fails_its_runs(tmp_path):
    """A multirun process that ends without a status for its runs (it died on import) failed them: not a budget."""
    runs = _runs(tmp_path / "runs")
    dies = (sys.executable, "-c", "import sys; print('ImportError: no module named torch'); sys.exit(1)")
    sweep = _sweep(runs, tmp_path, (), together=True)
    sweep.multirun = list(dies)
    sweep.run()
    assert [r.status for r in runs] == ["failed", "failed"]
    assert all("multirun exit 1: ImportError: no module named torch" in r.error for r in runs)


def test_resume_with_other_flags_is_refused(tmp_path):
    runs = _runs(tmp_path / "runs")
    runs[0].out.mkdir(parents=True)
    (runs[0].out / "last.pth.tar").write_bytes(b"x")
    (runs[0].out / "flags.json").write_text(json.dumps(["--seed", "7"]))
    with pytest.raises(BenchmarkError, match="other trainer flags"):
        pt.check_resumable(runs)


# ---- state across GPU jobs ---------------------------------------------------------------------------------


def _fake_run(runs_dir: Path, name: str, size: int, *, finished=False) -> Path:
    folder = runs_dir / name
    folder.mkdir(parents=True)
    (folder / "last.pth.tar").write_bytes(os.urandom(size))
    for f in ("args.yaml", "summary.csv", "log.txt", "flags.json"):
        (folder / f).write_text(f"{name} {f}\n")
    (folder / "trainer.log").write_text("not packed\n")
    if finished:
        (folder / "run.json").write_text("{}")
    return folder


def test_state_pack_unpack_round_trip(tmp_path):
    src = tmp_path / "a"
    _fake_run(src, "net/all/seed0", 30_000)
    _fake_run(src, "net/dap/seed0", 30_000)
    _fake_run(src, "net/random/seed1", 20_000)
    _fake_run(src, "net/dap/seed1", 1_000, finished=True)
    _fake_run(src, "net/fixed_subset/seed0", 1_000)  # in the CSV: done, not packed
    folders = pt.unfinished_runs(src, {("net", "fixed_subset", 0)})
    assert [str(f.relative_to(src)) for f in folders] == ["net/all/seed0", "net/dap/seed0", "net/random/seed1"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "paper_state_07.tar").write_bytes(b"stale")
    tars = pt.pack_state(folders, src, out, limit=64 * 1024)
    assert [t.name for t in tars] == ["paper_state_00.tar.gz", "paper_state_01.tar.gz"]  # 30k+20k | 30k in 64 KiB
    assert not (out / "paper_state_07.tar").exists() and all(t.stat().st_size <= 64 * 1024 for t in tars)
    dest = tmp_path / "b"
    _fake_run(dest, "net/all/seed0", 10, finished=True)  # finished here: left alone
    restored = pt.unpack_state(out, dest, done={("net", "random", 1)})
    assert restored == ["net/dap/seed0"]
    for f in pt.STATE_FILES:
        assert (dest / "net/dap/seed0" / f).read_bytes() == (src / "net/dap/seed0" / f).read_bytes()
    assert not (dest / "net/dap/seed0/trainer.log").exists()
    assert (dest / "net/all/seed0/last.pth.tar").stat().st_size == 10
    assert not (dest / "net/random/seed1").exists()


def test_bins_hold_at_most_15_mib_and_at_most_6_tars():
    mib = 2**20
    sizes = {"a": [10 * mib], "b": [6 * mib], "c": [4 * mib], "d": [1000, 2000]}
    bins = pt.bin_runs(sizes)
    assert bins == [["a", "c", "d"], ["b"]]  # first fit, largest first: b does not fit beside a
    assert all(pt._tar_bytes([s for n in b for s in sizes[n]]) <= pt.STATE_TAR_LIMIT for b in bins)
    assert pt.bin_runs({"x": [15 * mib - 4096]}) == [["x"]]
    with pytest.raises(BenchmarkError, match="over the 15 MiB"):
        pt.bin_runs({"x": [15 * mib]})  # the tar headers push it over
    with pytest.raises(BenchmarkError, match="need 7 state tars, over 6"):
        pt.bin_runs({str(i): [9 * mib] for i in range(7)})


def test_unpack_refuses_foreign_members(tmp_path):
    for name in ("../escape/seed0/last.pth.tar", "net/all/seed0/evil.sh"):
        state = tmp_path / name.split("/")[-1]
        state.mkdir()
        with tarfile.open(state / "paper_state_00.tar", "w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(BenchmarkError, match="not a paper_tables run file"):
            pt.unpack_state(state, tmp_path / "runs", set())
    assert not (tmp_path / "escape").exists()
    with pytest.raises(BenchmarkError, match="omit --state-in"):
        pt.unpack_state(tmp_path / "nope", tmp_path / "runs", set())


# ---- the table ---------------------------------------------------------------------------------------------


def test_table_paired_differences_and_dap_ahead():
    def rec(row, seed, top1, compute=0.6267):
        return dict(
            network="n", row=row, seed=seed, epochs=300, top1=top1, compute_measured=compute, device="d", commit="c"
        )

    records = [rec("dap", s, t) for s, t in ((0, 90.0), (1, 91.0), (2, 92.0))]
    records += [rec("all", s, t, 1.0) for s, t in ((0, 90.5), (1, 90.5), (2, 92.5))]
    records += [rec("random", 0, 89.0), rec("random", 1, 90.0), rec("other_net_dap", 0, 1.0), rec("infobatch", 2, 92.3)]
    assert pt.paired_vs_dap(records, "all") == [0.5, -0.5, 0.5]
    lines = pt.table2f(records, "n")
    assert lines[2] == "| all data (100%) | 300 | 3 | 91.17 ± 1.15 | 100.0% | +0.17 ± 0.58 | 1/3 | 94.54 | -0.09 |"
    assert lines[3] == "| DaP (hard) | 300 | 3 | 91.00 ± 1.00 | 62.7% |  |  | 94.63 |  |"
    assert lines[4] == "| random drop | 300 | 2 | 89.50 ± 0.71 | 62.7% | -1.00 ± 0.00 | 2/2 | 93.96 | -0.67 |"
    # one seed: its value without a spread (a sample std of one value is unknown, not 0)
    assert lines[5] == "| InfoBatch (r set for F) | 300 | 1 | 92.30 | 62.7% | +0.30 | 0/1 |  |  |"
    assert len(lines) == 6  # rows without runs are left out
    assert any("paper row − DaP" in line for line in pt.report_lines(records, Path("x.csv")))


def test_the_config_is_the_papers_schedule():
    pt.check_config()  # 300 epochs, W=40, I=10, p=0.9, R=150, LR /10 at 150 and 225, batch 128, wd 1e-4


def test_paper_numbers_are_table_2f():
    diffs = {row: round(v - pt.PAPER_2F["dap"], 2) for row, v in pt.PAPER_2F.items() if row != "dap"}
    assert diffs == {"all": -0.09, "random": -0.67, "fewer_epochs": -0.2, "fixed_subset": -2.42}


# ---- command line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dry-run", "--jobs", "0"], "--jobs"),
        (["--dry-run", "--seeds", "0", "0"], "each seed once"),
        (["--report", "--csv", "/nonexistent/t.csv"], "no results CSV"),
        (["--dry-run", "--networks", "no_such_net"], "unknown network"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert pt.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_report_reads_the_csv(tmp_path, capsys):
    path = tmp_path / "t.csv"
    for row, top1 in (("dap", 91.0), ("all", 90.0)):
        pt.append_csv(
            path,
            dict(
                network="cifar_resnet20",
                row=row,
                seed=0,
                epochs=300,
                top1=top1,
                compute_measured=1.0,
                wall_s=1,
                device="d",
                commit="c",
            ),
        )
    assert pt.main(["--report", "--csv", str(path)]) == 0
    assert "| all data (100%) | 300 | 1 | 90.00 | 100.0% | -1.00 | 1/1 |" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The GPU job's code paths on the CPU at toy size, through paper_tables.sh.

    Needs the trainer's ``--in-memory``, ``--eval-interval``, ``-vb`` and ``--dap-select infobatch`` flags; real
    CIFAR-10 JPEGs from ../shared/data/cifar10 (missing data fails this test: exit 2).
    """
    out, csv_path = tmp_path / "out", tmp_path / "t.csv"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            "benchmarks/paper_tables.sh",
            "--dry-run",
            "--work-dir",
            str(tmp_path / "work"),
            "--data",
            str(CIFAR),
            "--csv",
            str(csv_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == pt.CSV_COLUMNS
    assert sorted(r["row"] for r in rows) == sorted(pt.ROWS)
    assert all(r["device"].startswith("cpu: ") and float(r["top1"]) >= 0 for r in rows)
    result = json.loads((out / "paper_tables.json").read_text())
    assert {r["status"] for r in result["runs"]} == {"finished"} and result["aggregate_img_per_s"] > 0
    assert (out / "t.csv").read_text() == csv_path.read_text()
    assert proc.stdout.strip().splitlines()[-1].startswith("state out: 0 tars")


def test_portable_ignores_loader_workers_but_not_the_schedule():
    a = ["--data-dir", "/x", "-j", "0", "--epochs", "300"]
    assert pt.portable(a) == pt.portable(["--data-dir", "/y", "-j", "4", "--epochs", "300"])
    assert pt.portable(a) != pt.portable(["--data-dir", "/x", "-j", "0", "--epochs", "200"])


def test_planned_epochs_reads_both_args_yaml_formats(tmp_path):
    """args.yaml holds the unscaled epochs since 2026-11-27 (it trains the same run when read back); before, the scaled
    ones with baseline_epochs beside them."""
    (tmp_path / "args.yaml").write_text("epochs: 300\nepochs_scale: 0.625\n")
    assert pt._planned_epochs(tmp_path) == 188
    (tmp_path / "args.yaml").write_text("epochs: 188\nepochs_scale: 0.625\nbaseline_epochs: 300\n")
    assert pt._planned_epochs(tmp_path) == 188
    (tmp_path / "args.yaml").write_text("epochs: 300\nepochs_scale: null\n")
    assert pt._planned_epochs(tmp_path) == 300
