"""End to end on coco_mini (val cut to 20 images) through tools/transfer_coco.sh: fine-tune a few
iterations, COCO-evaluate, metrics.json, the report; and every bad input is one stderr line with
exit code 2 and nothing written.

Runs shrink the stock schedules with --cfg-options only (the configs stay the paper's):
one epoch over a few images at reduced size, workers off, and a score threshold of 0 so the
evaluator scores real (if poor) detections rather than an empty result.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from downstream.report import main as report_main
from downstream.transfer import default_work_dir
from downstream.transfer import main as transfer_main

REPO = Path(__file__).resolve().parents[2]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"
COCO_POSE_TINY = COCO_MINI.parent / "coco_pose_tiny"
SCRIPT = REPO / "tools" / "transfer_coco.sh"

_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
_NO_WORKERS = [f"{s}.{k}={v}" for s in _LOADERS for k, v in (("num_workers", 0), ("persistent_workers", False))]
# val_begin=2: no validation inside the one epoch (mmengine validates the last epoch); runner.test() evaluates.
_ONE_EPOCH = ["train_cfg.max_epochs=1", "train_cfg.val_begin=2", "default_hooks.logger.interval=1"]
_DET = [
    "train_dataloader.dataset.indices=4",  # 2 iterations at batch 2
    "test_dataloader.dataset.indices=10",  # COCOeval still scores all 20 images' ground truth (39 -> 26 s a run)
    "train_dataloader.dataset.pipeline.2.scale=(200,120)",  # 400x240: 4.8 s an iteration, 200x120: 1.8 s
    "test_dataloader.dataset.pipeline.1.scale=(200,120)",
    "model.test_cfg.rcnn.score_thr=0.0",
    "model.test_cfg.rcnn.max_per_img=20",
    # fewer RoIs (stock: 1000 test proposals, 512 sampled train RoIs): the RoI head dominates CPU time
    "model.test_cfg.rpn.nms_pre=300",
    "model.test_cfg.rpn.max_per_img=100",
    "model.train_cfg.rpn_proposal.max_per_img=300",
    "model.train_cfg.rcnn.sampler.num=128",
]
FAST = {
    "faster_rcnn": _NO_WORKERS + _ONE_EPOCH + _DET,
    "mask_rcnn": _NO_WORKERS + _ONE_EPOCH + _DET,
    "simplebaseline": _NO_WORKERS
    + _ONE_EPOCH
    + [
        "train_dataloader.dataset.indices=8",  # 2 iterations at batch 4
        "train_dataloader.batch_size=4",
        "test_dataloader.dataset.indices=16",  # one test batch of person boxes (33 -> 22 s a run)
        "test_dataloader.batch_size=16",
        "model.test_cfg.flip_test=False",  # halves the test time
    ],
}
KEYS = {
    "faster_rcnn": [f"coco/bbox_mAP{s}" for s in ("", "_50", "_75", "_s", "_m", "_l")],
    "simplebaseline": [f"coco/{m}{s}" for m in ("AP", "AR") for s in ("", " .5", " .75", " (M)", " (L)")],
}
KEYS["mask_rcnn"] = KEYS["faster_rcnn"] + [k.replace("bbox", "segm") for k in KEYS["faster_rcnn"]]


def transfer(task, backbone, work_dir, *extra, data_root):
    cmd = ["bash", str(SCRIPT), task, str(backbone), "--data-root", str(data_root), "--work-dir", str(work_dir)]
    return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(mm, exports, coco_root, tmp_path_factory) -> dict[str, Path]:
    """Work dirs of the four real runs: each task from the full export, and pose from the DaP export too."""
    root = tmp_path_factory.mktemp("transfer")
    plan = {
        "faster_rcnn": ("faster_rcnn", "full"),
        "mask_rcnn": ("mask_rcnn", "full"),
        "simplebaseline": ("simplebaseline", "full"),
        "simplebaseline_dap": ("simplebaseline", "dap"),
    }
    out = {}
    for name, (task, export) in plan.items():
        proc = transfer(task, exports[export], root / name, "--cfg-options", *FAST[task], data_root=coco_root)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn", "simplebaseline"])
def test_metrics_json_holds_every_evaluator_key(runs, exports, name):
    result = json.loads((runs[name] / "metrics.json").read_text())
    for key in KEYS[name]:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert "note" not in result  # score threshold 0: the evaluator scored real detections
    assert result["backbone"] == json.loads((exports["full"] / "meta.json").read_text())
    run = result["run"]
    assert run["train_iters"] >= 2 and run["train_sec_per_iter"] > run["train_data_sec_per_iter"] >= 0
    assert run["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    assert run["train_batch_size_per_gpu"] == (4 if name == "simplebaseline" else 2) and run["world_size"] == 1
    assert run["person_boxes"] == ("gt" if name == "simplebaseline" else None)


def test_report_prints_table_9_with_deltas_and_table_8(runs, capsys):
    dirs = [runs[n] for n in ("simplebaseline_dap", "simplebaseline", "faster_rcnn", "mask_rcnn")]
    assert report_main([str(d) for d in dirs]) == 0
    out = capsys.readouterr().out
    full, dap = [json.loads((runs[n] / "metrics.json").read_text()) for n in ("simplebaseline", "simplebaseline_dap")]
    delta = 100 * dap["coco/AP"] - 100 * full["coco/AP"]
    bold = "**" * (round(100 * full["coco/AP"], 1) >= round(100 * dap["coco/AP"], 1))
    rows = [line for line in out.splitlines() if line.startswith("| SimpleBaseline | ResNet-50 |")]
    assert rows[0].startswith(f"| SimpleBaseline | ResNet-50 | 100% | {bold}{100 * full['coco/AP']:.1f}")
    assert rows[1].split(" | ")[3].endswith(f"({delta:+.1f})")
    assert "| FPN | ResNet-50 | 100% |" in out and "| Mask R-CNN | ResNet-50 | 100% |" in out
    assert "table,method,backbone,compute,AP_bb,AP_bb_delta" in out


def test_a_moved_work_dir_resumes_from_its_own_checkpoint(runs, exports, coco_root, tmp_path):
    """mmengine's last_checkpoint holds an absolute path; in a copied work dir it names the original, outside the
    trusted folders, and resume=True failed with torch's weights_only traceback. The copy's own checkpoint is used;
    a copy without it is one line."""
    moved = tmp_path / "moved"
    shutil.copytree(runs["simplebaseline"], moved)
    named = Path((moved / "last_checkpoint").read_text().strip())
    assert named.parent == runs["simplebaseline"]  # the original's path
    args = ["--cfg-options", *FAST["simplebaseline"], "resume=True", "--overwrite"]
    proc = transfer("simplebaseline", exports["full"], moved, *args, data_root=coco_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"transfer_coco: resuming from {moved / named.name}" in proc.stdout
    assert json.loads((moved / "metrics.json").read_text())["run"]["train_iters"] == named_iters(named)
    (moved / named.name).unlink()
    proc = transfer("simplebaseline", exports["full"], moved, *args, data_root=coco_root)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "pass --cfg-options resume=True load_from=" in lines[0]


def test_overwrite_keeps_the_previous_run_until_the_first_checkpoint(runs, exports, coco_root, tmp_path, monkeypatch):
    """--overwrite replaced only metrics.json: the previous run's epoch_N.pth and last_checkpoint stayed beside the
    new run's. They now wait in .replaced/ with its metrics.json: back if the run stops before its first
    checkpoint, gone once it has saved one."""
    from mmengine.runner import Runner

    work = tmp_path / "again"
    shutil.copytree(runs["simplebaseline"], work)
    (work / "epoch_9.pth").write_bytes(b"an old epoch the new run will not write")

    def files() -> dict:  # less the lock and the config dump, which mmengine rewrites as it builds the runner
        return {p.name: p.read_bytes() for p in work.iterdir() if p.is_file() and p.suffix not in (".lock", ".py")}

    before = files()
    everything = {str(p.relative_to(work)): p.read_bytes() if p.is_file() else None for p in work.rglob("*")}
    argv = ["simplebaseline", str(exports["full"]), "--data-root", str(coco_root), "--work-dir", str(work)]
    argv += ["--overwrite", "--cfg-options", *FAST["simplebaseline"]]

    def fails_in_its_first_epoch(self):
        self.call_hook("before_train")
        raise RuntimeError("out of memory (a stand-in)")

    monkeypatch.setattr(Runner, "train", fails_in_its_first_epoch)
    with pytest.raises(RuntimeError, match="stand-in"):
        transfer_main(argv)
    assert files() == before
    assert not (work / ".replaced").exists()
    # it failed before its first iteration: the config dump and log folder it wrote are taken back too
    assert {str(p.relative_to(work)): p.read_bytes() if p.is_file() else None for p in work.rglob("*")} == everything
    monkeypatch.undo()
    # a process of its own, as a user runs it (mmengine's visualizer outlives a runner within one process)
    proc = transfer("simplebaseline", exports["full"], work, *argv[6:], data_root=coco_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (work / ".replaced").exists() and not (work / "epoch_9.pth").exists()
    assert (work / "metrics.json").read_bytes() != before["metrics.json"]


def named_iters(checkpoint: Path) -> int:
    """The iteration count a checkpoint was saved at (mmengine's meta)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["meta"]["iter"]


def test_mmengine_checkpoint_loads_only_from_trusted_folders(runs, tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader

    from downstream.compat import trusted_checkpoints

    ckpt = runs["simplebaseline"] / "epoch_1.pth"
    elsewhere = tmp_path / "epoch_1.pth"
    shutil.copy(ckpt, elsewhere)
    with pytest.raises(Exception, match="weights_only"):  # torch>=2.6 default refuses mmengine's pickled objects
        CheckpointLoader.load_checkpoint(str(ckpt), map_location="cpu")
    with trusted_checkpoints([runs["simplebaseline"]]):
        state = CheckpointLoader.load_checkpoint(str(ckpt), map_location="cpu")
        with pytest.raises(Exception, match="weights_only"):  # same bytes, untrusted folder
            CheckpointLoader.load_checkpoint(str(elsewhere), map_location="cpu")
    assert state["meta"]["epoch"] == 1 and "message_hub" in state
    with pytest.raises(Exception, match="weights_only"):  # mmengine's own loader is back
        CheckpointLoader.load_checkpoint(str(ckpt), map_location="cpu")


@pytest.mark.parametrize("task", ["faster_rcnn", "mask_rcnn"])
def test_an_empty_evaluation_is_recorded_as_zeros_with_a_note(mm, make_export, coco_root, tmp_path, capsys, task):
    """The issue's new-user run in small: an untrained ResNet-50, one iteration, the STOCK score threshold (0.05).

    The untrained head scores every class about 1/81, so no box passes: mmdet logs that the results are empty
    and returns no metric at all. The run still records every column as 0.0, with the reason in one line.
    """
    r50 = make_export("r50_untrained", model="resnet50", compute_fraction=1.0, seed=0)
    opts = (
        _NO_WORKERS
        + _ONE_EPOCH
        + [
            "randomness.seed=0",
            "train_dataloader.dataset.indices=2",  # one iteration at batch 2
            "train_dataloader.dataset.pipeline.2.scale=(200,120)",
            "test_dataloader.dataset.indices=4",  # COCOeval still scores all 20 images' ground truth
            "test_dataloader.dataset.pipeline.1.scale=(200,120)",
        ]
    )
    work = tmp_path / task
    proc = transfer(task, r50, work, "--cfg-options", *opts, data_root=coco_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "The testing results of the whole dataset is empty" in proc.stdout + proc.stderr
    note = (
        "no detection above the score threshold (model.test_cfg.rcnn.score_thr=0.05) on the 4 test images: "
        "every COCO column recorded as 0.0"
    )
    assert f"transfer_coco: note: {note}\n" in proc.stdout
    result = json.loads((work / "metrics.json").read_text())
    assert {k: result[k] for k in KEYS[task]} == dict.fromkeys(KEYS[task], 0.0) and result["note"] == note
    assert report_main([str(work), "--format", "md"]) == 0
    md = capsys.readouterr().out
    method = "FPN" if task == "faster_rcnn" else "Mask R-CNN"
    assert md.splitlines()[2].endswith(" | Note |")
    zeros = " | ".join(["0.0"] * len(KEYS[task]) + ["-"] * (12 - len(KEYS[task])))
    assert f"| {method} | ResNet-50 | 100% | {zeros} | {note} |" in md


# ---- bad input: one line on stderr, exit code 2, nothing written ----


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A writable copy of coco_mini's annotations with the image folders linked (read-only originals)."""
    root = tmp_path / "coco"
    shutil.copytree(COCO_MINI / "annotations", root / "annotations")
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(COCO_MINI / split)
    return root


def _assert_refused(capsys, argv, expect, work_dir):
    assert transfer_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("transfer_coco: error:") and expect in err, err
    assert not work_dir.exists()


def _bad_annotations(root):
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')


def _no_annotations(root):
    (root / "annotations" / "instances_train2017.json").unlink()


def _not_coco(root):
    (root / "annotations" / "instances_val2017.json").write_text('{"info": {}}')


def _wrong_images(root):
    (root / "train2017").unlink()
    (root / "train2017").symlink_to(COCO_MINI / "val2017")


def _no_keypoints(root):
    shutil.copy(root / "annotations" / "instances_val2017.json", root / "annotations" / "person_keypoints_val2017.json")


def _edit(root, name, change):
    path = root / "annotations" / name
    ann = json.loads(path.read_text())
    change(ann)
    path.unlink()  # data_root links some files to the read-only originals: write a new file, not through the link
    path.write_text(json.dumps(ann))


def _no_val_images(root):  # valid JSON, nothing to load: mmengine's "need at least one array to concatenate"
    _edit(root, "instances_val2017.json", lambda a: a.update(images=[], annotations=[]))


def _unknown_categories(root):  # every box of a category the file does not list: mmdet drops every image
    _edit(root, "instances_train2017.json", lambda a: [b.update(category_id=12345) for b in a["annotations"]])


def _no_visible_keypoints(root):
    _edit(root, "person_keypoints_train2017.json", lambda a: [b.update(num_keypoints=0) for b in a["annotations"]])


@pytest.mark.parametrize(
    "task, mutate, expect",
    [
        ("faster_rcnn", _bad_annotations, "instances_val2017.json is not valid JSON"),
        ("mask_rcnn", _no_annotations, "instances_train2017.json not found"),
        ("faster_rcnn", _not_coco, "malformed (no images, annotations, categories list)"),
        ("faster_rcnn", _wrong_images, "images listed in"),
        ("simplebaseline", _no_keypoints, "has no keypoint category"),
        ("faster_rcnn", _no_val_images, "instances_val2017.json lists no images"),
        ("mask_rcnn", _unknown_categories, "has no box of a listed category on its images"),
        ("simplebaseline", _no_visible_keypoints, "has no person instance with keypoints"),
    ],
    ids=["malformed-json", "missing-file", "not-coco", "images-mismatch", "no-keypoints", "no-images",
         "unknown-categories", "no-visible-keypoints"],
)  # fmt: skip
def test_bad_annotations(mm, exports, data_root, tmp_path, capsys, task, mutate, expect):
    mutate(data_root)
    work = tmp_path / "work"
    _assert_refused(
        capsys, [task, str(exports["full"]), "--data-root", str(data_root), "--work-dir", str(work)], expect, work
    )


def test_backbone_of_another_architecture(mm, make_export, tmp_path, capsys):
    r18 = make_export("r18", model="resnet18", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    argv = ["faster_rcnn", str(r18 / "backbone.pth"), "--model", "resnet50", "--data-root", str(COCO_MINI)]
    _assert_refused(capsys, [*argv, "--work-dir", str(work)], "does not fit the backbone of faster-rcnn_r50", work)


def test_a_backbone_changed_by_cfg_options_is_blamed_on_them(mm, exports, tmp_path, capsys):
    """A resnet50 export fits the stock config; --cfg-options model.backbone.depth=101 makes it not fit, and the
    refusal names that option (it used to say to pass another export)."""
    work = tmp_path / "work"
    argv = ["faster_rcnn", str(exports["full"]), "--data-root", str(COCO_MINI), "--work-dir", str(work)]
    _assert_refused(
        capsys, [*argv, "--cfg-options", "model.backbone.depth=101"], "as --cfg-options model.backbone.depth ", work
    )


def test_cfg_options_are_not_blamed_for_a_wrong_export(mm, make_export, tmp_path, capsys):
    """An option that leaves the architecture alone is not blamed when the export itself does not fit."""
    r18 = make_export("r18", model="resnet18", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    argv = ["faster_rcnn", str(r18 / "backbone.pth"), "--model", "resnet50", "--data-root", str(COCO_MINI)]
    argv += ["--work-dir", str(work), "--cfg-options", "model.backbone.frozen_stages=-1"]
    _assert_refused(capsys, argv, "pass an export of the architecture the config expects", work)


def test_malformed_meta_and_missing_person_dets(mm, exports, tmp_path, capsys):
    bad = tmp_path / "bad_export"
    shutil.copytree(exports["full"], bad)
    (bad / "meta.json").write_text("{}")
    work = tmp_path / "work"
    common = ["--data-root", str(COCO_MINI), "--work-dir", str(work)]
    _assert_refused(capsys, ["simplebaseline", str(bad), *common], "meta.json is malformed", work)
    missing = tmp_path / "dets.json"
    argv = ["simplebaseline", str(exports["full"]), "--person-dets", str(missing), *common]
    _assert_refused(capsys, argv, "person detection file", work)
    dets = COCO_POSE_TINY / "test_coco_det_AP_H_56.json"  # real person boxes, given to a detection task
    argv = ["faster_rcnn", str(exports["full"]), "--person-dets", str(dets), *common]
    _assert_refused(capsys, argv, "--person-dets is for simplebaseline only, not faster_rcnn; drop it", work)


def test_person_boxes_pose_evaluation_could_not_score(mm, make_export, tmp_path, capsys):
    """Boxes on images the annotations lack (mmpose would fail on them), or none left above the dataset's
    box-score threshold (an evaluation with nothing to score): refused before anything is built."""
    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    common = ["simplebaseline", str(r50), "--data-root", str(COCO_MINI), "--work-dir", str(work)]
    tiny_dets = REPO.parent / "shared" / "data" / "coco_pose_tiny" / "test_coco_det_AP_H_56.json"
    _assert_refused(capsys, [*common, "--person-dets", str(tiny_dets)], "are on images not in", work)
    val = json.loads((COCO_MINI / "annotations" / "person_keypoints_val2017.json").read_text())
    dets = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.5}
        for a in val["annotations"]
        if a["num_keypoints"]
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    argv = [*common, "--person-dets", str(tmp_path / "dets.json")]
    _assert_refused(
        capsys,
        [*argv, "--cfg-options", "test_dataloader.dataset.filter_cfg.bbox_score_thr=0.9"],
        "has no person box (category_id 1) with score >= 0.9",
        work,
    )


def test_existing_metrics_json_is_kept(mm, exports, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "metrics.json").write_text("earlier result")
    assert (
        transfer_main(["faster_rcnn", str(exports["full"]), "--data-root", str(COCO_MINI), "--work-dir", str(work)])
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert (work / "metrics.json").read_text() == "earlier result" and len(list(work.iterdir())) == 1


def test_check_resolves_every_input_and_writes_nothing(mm, exports, tmp_path, capsys):
    """``--check`` (what ``--gpus N`` runs once before torchrun): 0 and one line for good inputs, the usual one-line
    refusal for bad ones; neither trains nor makes the work dir."""
    work = tmp_path / "work"
    argv = ["faster_rcnn", str(exports["full"]), "--data-root", str(COCO_MINI), "--work-dir", str(work), "--check"]
    assert transfer_main(argv) == 0
    assert capsys.readouterr().out.startswith("transfer_coco: inputs ok for faster_rcnn")
    assert not work.exists()
    argv[1] = str(tmp_path / "missing")
    assert transfer_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and not work.exists()


def test_gpus_n_checks_inputs_once_before_torchrun(tmp_path):
    """With --gpus, a bad input stops the script before torchrun: the check's one line and its exit 2 (a python
    whose torch sees 2 GPUs and whose check refuses stands in)."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = -c ]; then echo 2; exit 0; fi\n'
        'for a in "$@"; do [ "$a" = --check ] && { echo "transfer_coco: error: bad backbone" >&2; exit 2; }; done\n'
        'echo "$@"\n'
    )
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "faster_rcnn", "EXPORT", "--gpus", "2", "--work-dir", "W"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "DAP_PYTHON": str(fake)},
    )
    assert proc.returncode == 2 and proc.stdout == ""  # torchrun never started
    assert proc.stderr.strip().splitlines() == ["transfer_coco: error: bad backbone"]


def test_input_refusals_are_marked_as_every_ranks(tmp_path):
    """Under torchrun started directly every process checks the inputs and refuses alike: marked, the line is
    printed once per node (it was once per process)."""
    from downstream import TransferInputError
    from downstream.transfer import run_transfer

    with pytest.raises(TransferInputError, match="unknown TASK 'detr'") as e:
        run_transfer(task="detr", backbone=tmp_path, data_root=COCO_MINI, work_dir=tmp_path / "work")
    assert e.value.every_rank and not (tmp_path / "work").exists()


def test_unknown_task_through_the_shell(tmp_path):
    proc = transfer("detr", tmp_path, tmp_path / "work", data_root=COCO_MINI)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "transfer_coco: error: unknown TASK 'detr'; use one of faster_rcnn, mask_rcnn, simplebaseline"
    ]


def test_refusals_after_mm_is_imported_are_one_line_through_the_shell(mm, make_export, tmp_path):
    """Through tools/transfer_coco.sh as a user runs it: a refusal that comes after mmengine is imported is still one
    stderr line (mmengine's import of pkg_resources printed two warnings, 4 lines, before it); so are a
    --cfg-options item without '=' (mmengine's DictAction raised a traceback), a misspelt flag (argparse printed its
    usage) and --gpus without a number."""
    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    refusals = {
        "annotation file": ["--data-root", str(tmp_path / "nowhere")],
        "--cfg-options 'foo' is not KEY=VALUE": ["--cfg-options", "foo"],
        "unrecognized arguments: --wrok-dir x; did you mean --work-dir for --wrok-dir?": ["--wrok-dir", "x"],
        "--gpus needs a number; pass e.g. --gpus 8": ["--gpus", "--check"],
    }
    for words, extra in refusals.items():
        cmd = ["bash", str(SCRIPT), "faster_rcnn", str(r50), "--work-dir", str(work), *extra]
        if "--data-root" not in extra:
            cmd += ["--data-root", str(COCO_MINI)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
        assert lines[0].startswith("transfer_coco: error: ") and not work.exists()
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], cwd=REPO, capture_output=True, text=True).stdout
    assert "--gpus N" in help_text


def test_inputs_that_would_fail_after_the_check_are_refused_by_it(mm, make_export, tmp_path, capsys):
    """--check said "inputs ok" for a ViT (its feature levels all have stride 16: training then failed with a
    traceback) and for a --work-dir that is a file; and --cfg-options could swap the backbone's weights for others
    while metrics.json kept BACKBONE's label. Each is now the check's one line."""
    vit = make_export("vit", model="vit_tiny_patch16_224", compute_fraction=1.0, seed=0)
    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    common = ["--data-root", str(COCO_MINI), "--check"]
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    cases = [
        (["faster_rcnn", str(vit), "--work-dir", str(work)], "have strides [16, 16, 16, 16], not [4, 8, 16, 32]"),
        (["faster_rcnn", str(r50), "--work-dir", str(a_file)], f"--work-dir {a_file} is a file; pass a folder"),
        (
            ["faster_rcnn", str(r50), "--work-dir", str(work), "--cfg-options", "load_from=other.pth"],
            "--cfg-options load_from would train other weights than BACKBONE",
        ),
        (
            ["mask_rcnn", str(r50), "--work-dir", str(work), "--cfg-options", "model.backbone.init_cfg.checkpoint=x"],
            "pass those weights as BACKBONE instead",
        ),
    ]
    for argv, expect in cases:
        _assert_refused(capsys, [*argv, *common], expect, work)
    assert a_file.read_text() == "kept"


def test_cfg_options_a_build_would_refuse_are_refused_by_the_check(mm, make_export, tmp_path, capsys):
    """A misspelled key passed --check, then mmengine's TypeError traceback when the Runner built the model, a
    pipeline (the test loader's after training) or the optimizer; an index past a list's end was mmengine's
    KeyError traceback from the merge. Each is now the check's one line naming the option (hunt of session 20)."""
    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    cases = [
        ("faster_rcnn", "model.backbone.depthh=50", "model.backbone.depthh: ResNet takes no argument 'depthh' (did "
         "you mean model.backbone.depth?); fix or drop it"),
        ("mask_rcnn", "model.roi_head.mask_head.num_convz=2", "model.roi_head.mask_head.num_convz: FCNMaskHead takes "
         "no argument 'num_convz' (did you mean model.roi_head.mask_head.num_convs?)"),
        ("faster_rcnn", "test_dataloader.dataset.pipeline.1.scalee=(200,120)", "test_dataloader.dataset.pipeline.1."
         "scalee: Resize takes no argument 'scalee' (did you mean test_dataloader.dataset.pipeline.1.scale?)"),
        ("faster_rcnn", "optim_wrapper.optimizer.momentun=0.8", "optim_wrapper.optimizer.momentun: SGD takes no "
         "argument 'momentun' (did you mean optim_wrapper.optimizer.momentum?)"),
        ("faster_rcnn", "param_scheduler.5.end=3", "param_scheduler.5.end: param_scheduler has 2 items (LinearLR, "
         "MultiStepLR), so index 5 is past its end; use param_scheduler.0 to param_scheduler.1"),
        ("simplebaseline", "train_dataloader.dataset.pipeline.2.directon=horizontal", "train_dataloader.dataset."
         "pipeline.2.directon: RandomFlip takes no argument 'directon' (did you mean train_dataloader.dataset."
         "pipeline.2.direction?)"),
        ("simplebaseline", "model.head.out_channel=17", "model.head.out_channel: HeatmapHead takes no argument "
         "'out_channel' (did you mean model.head.out_channels?)"),
    ]  # fmt: skip
    for task, option, expect in cases:
        argv = [task, str(r50), "--data-root", str(COCO_MINI), "--work-dir", str(work), "--check"]
        _assert_refused(capsys, [*argv, "--cfg-options", option], f"transfer_coco: error: --cfg-options {expect}", work)
    argv = ["faster_rcnn", str(r50), "--data-root", str(COCO_MINI), "--work-dir", str(work), "--check"]
    assert transfer_main([*argv, "--cfg-options", *FAST["faster_rcnn"]]) == 0  # the tests' own options still build
    assert "inputs ok" in capsys.readouterr().out


def test_work_dirs_a_run_would_overwrite_or_fail_in_are_refused_by_the_check(mm, make_export, tmp_path, capsys):
    """A hunt as a new user (session 20) found these passing --check, then a traceback or lost files: work_dir= in
    --cfg-options wrote into another run's folder (exit 0, and 'wrote' named the unused --work-dir); a transfer
    into a pretrain_mm run's folder replaced its epoch_1.pth and last_checkpoint; a --work-dir below a file, a
    resume from a missing load_from and a test evaluator setting mmdet refuses failed with tracebacks, the last
    one only after training (and, with --overwrite, after the previous run's files were gone). Each is one line,
    and nothing is written."""
    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    pretrained = tmp_path / "mm_run"  # a finished tools/pretrain_mm.sh (or dap_pretrain.train) run
    unfinished = tmp_path / "stopped"  # a transfer stopped after its first checkpoint
    for folder, files in ((pretrained, ("run.json", "epoch_1.pth", "last_checkpoint")), (unfinished, ("epoch_1.pth",))):
        folder.mkdir()
        for name in files:
            (folder / name).write_text(name)
    (unfinished / "last_checkpoint").write_text(str(unfinished / "epoch_1.pth"))
    killed = tmp_path / "killed"  # an --overwrite killed before its first checkpoint: the old run waits in .replaced/
    (killed / ".replaced").mkdir(parents=True)
    (killed / ".replaced" / "metrics.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (["--work-dir", str(work), "--cfg-options", f"work_dir={tmp_path / 'other'}"], "pass --work-dir instead"),
        (["--work-dir", ""], "--work-dir is empty"),
        (["--work-dir", str(a_file / "sub")], f"--work-dir {a_file / 'sub'} is under {a_file}, which is a file"),
        (["--work-dir", str(killed)], "holds an --overwrite that was killed before its first checkpoint"),
        (["--work-dir", str(pretrained)], "holds a pre-training run (run.json)"),
        (["--work-dir", str(unfinished)], "holds an unfinished run (last_checkpoint); pass --cfg-options resume=True"),
        (
            ["--work-dir", str(work), "--cfg-options", "resume=True", f"load_from={tmp_path / 'gone.pth'}"],
            f"load_from={tmp_path / 'gone.pth'} is not a file",
        ),
        (
            ["--work-dir", str(work), "--cfg-options", "test_evaluator.metric=nonsense"],
            "test_evaluator cannot be built (KeyError: \"metric should be one of 'bbox'",
        ),
    ]
    for args in ([], ["--check"]):
        for argv, expect in cases:
            assert transfer_main(["faster_rcnn", str(r50), "--data-root", str(COCO_MINI), *argv, *args]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("transfer_coco: error:") and expect in err, (argv, err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not work.exists() and not (tmp_path / "other").exists()
    # resume=True continues the unfinished run's folder: not refused by the check
    argv = ["faster_rcnn", str(r50), "--data-root", str(COCO_MINI), "--work-dir", str(unfinished), "--check"]
    assert transfer_main([*argv, "--cfg-options", "resume=True"]) == 0


def test_a_work_dir_in_use_by_another_run_is_refused(mm, make_export, tmp_path, capsys):
    """Two runs in one work dir (say one per GPU, with the same --work-dir) shared epoch_N.pth and last_checkpoint,
    and the last metrics.json won. The second is now one line, before it writes anything."""
    import fcntl

    r50 = make_export("r50", model="resnet50", compute_fraction=1.0, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    with open(work / ".dap.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        argv = ["faster_rcnn", str(r50), "--data-root", str(COCO_MINI), "--work-dir", str(work)]
        assert transfer_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"work dir {work} is in use by another run" in err[0], err
    assert [p.name for p in work.iterdir()] == [".dap.lock"]


@pytest.mark.parametrize(
    "backbone, name",
    [
        ("exports/resnet50.dap75_in1k", "resnet50.dap75_in1k"),  # a folder's name whole: it was cut at the first dot
        ("exports/resnet50.full_in1k", "resnet50.full_in1k"),
        ("exports/resnet50.dap75_in1k/backbone.pth", "resnet50.dap75_in1k"),  # every export's file name: the folder
        ("weights/r50_torchvision.pth", "r50_torchvision"),
    ],
)
def test_default_work_dir_names_the_backbone(tmp_path, monkeypatch, backbone, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / backbone).parent.mkdir(parents=True, exist_ok=True)
    if backbone.endswith(".pth"):
        (tmp_path / backbone).write_bytes(b"")
    else:
        (tmp_path / backbone).mkdir()
    assert default_work_dir("mask_rcnn", backbone) == f"work_dirs/mask_rcnn/{name}"


def test_more_gpus_than_torch_sees_is_one_line(tmp_path):
    have = torch.cuda.device_count()
    ask = have + 1  # on a CPU machine: --gpus 1, which also goes through torchrun
    proc = subprocess.run(
        ["bash", str(SCRIPT), "simplebaseline", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--gpus", str(ask)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and not (tmp_path / "w").exists()
    fix = "drop --gpus to run one process on the CPU" if have == 0 else f"pass --gpus {have} or fewer"
    assert proc.stderr.strip().splitlines() == [
        f"transfer_coco: error: --gpus {ask} but torch sees {have} CUDA device(s); {fix} "
        "(--gpus N starts N processes through torchrun, one per GPU)"
    ]


@pytest.mark.parametrize(
    "gpus, said",
    [
        (["--gpus", "-1"], "--gpus -1 is not a positive integer"),  # was "--gpus needs a number"
        (["--gpus", "0"], "--gpus 0 is not a positive integer; drop --gpus to run one process"),
        (["--gpus", "--cfg-options"], "--gpus needs a number"),
        (["--gpus"], "--gpus needs a number"),
    ],
)
def test_gpus_takes_a_positive_count(tmp_path, gpus, said):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "faster_rcnn", "EXPORT", "--work-dir", str(tmp_path / "w"), *gpus],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(f"transfer_coco: error: {said}"), err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "gpus, launch",
    [
        ([], "-m downstream.transfer faster_rcnn EXPORT --work-dir W"),
        (
            ["--gpus", "1"],
            "-m torch.distributed.run --nproc_per_node=1 --master_port=29500 -m downstream.transfer "
            "faster_rcnn EXPORT --work-dir W --launcher pytorch",
        ),
        (
            ["--gpus=2"],
            "-m torch.distributed.run --nproc_per_node=2 --master_port=29500 -m downstream.transfer "
            "faster_rcnn EXPORT --work-dir W --launcher pytorch",
        ),
    ],
    ids=["plain", "gpus-1-torchrun", "gpus-2-torchrun"],
)
def test_gpus_n_always_goes_through_torchrun(tmp_path, gpus, launch):
    """The launch line the script builds, with DAP_PYTHON standing in for a python whose torch sees 2 GPUs."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = -c ]; then echo 2; else echo "$@"; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "DAP_PYTHON": str(fake)}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "faster_rcnn", "EXPORT", *gpus, "--work-dir", "W"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == launch, proc.stderr
