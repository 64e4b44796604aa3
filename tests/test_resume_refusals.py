"""Resume refusals: a checkpoint this run cannot continue is one line naming what differs as flags and the fix
(exit 2, nothing in the run folder changed); other changed flags are allowed and logged; the run folder's,
the disk's and the --resume path's messages name a fix that works."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import pytest
import torch
from test_faults_run_folder import _cli, _files, _one_line_error

from dap_pretrain.checkpoint import CheckpointError, StorageError, load_checkpoint, write_atomic
from dap_pretrain.errors import UsageError
from dap_pretrain.run_folder import check_output_dir
from dap_pretrain.runner import _build_optimizer, _build_sampler, _check_resumable
from dap_pretrain.train import main as train_main
from dap_pretrain.train import parse_args, run_config

REPO = Path(__file__).resolve().parents[1]
CKPT = "O/last.pth.tar"
# Run b of the review: 4 epochs, a drop at epoch 2, all data back at 3.
RUN_B = ["--epochs", "4", "--dap-warmup", "1", "--dap-interval", "1", "--dap-keep", "0.5", "--decay-milestones", "3"]
RUN_B += ["--dap-reuse", "3", "--model", "cifar_resnet20"]


def _state(argv, *, num_samples: int = 100):
    """This run's resolved config, sampler and optimizer, as the trainer builds them from ``argv``."""
    cfg = run_config(parse_args(argv))
    sampler, *_ = _build_sampler(cfg, num_samples, 1, 0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    return cfg, sampler, _build_optimizer(cfg, model)


def _checkpoint(argv, **kw) -> dict:
    """A checkpoint as :meth:`TrainState.state_dict` writes it, for the fields the checks read."""
    cfg, sampler, optimizer = _state(argv, **kw)
    args = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {
        "arch": cfg.model,
        "num_classes": 10,
        "epoch": 2,
        "state_dict": {},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {},
        "sampler": sampler.state_dict(),
        "accounting": {},
        "history": [],
        "args": args,
    }


def _check(ckpt: dict, argv, **kw) -> None:
    cfg, sampler, optimizer = _state(argv, **kw)
    _check_resumable(ckpt, CKPT, cfg=cfg, num_classes=10, sampler=sampler, optimizer=optimizer)


def _refusal(ckpt: dict, argv, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        _check(ckpt, argv, **kw)
    message = str(e.value)
    assert "\n" not in message and "{" not in message, message  # flags, not a dict of DaP parameters
    return message


def test_changed_dap_flags_are_named_as_flags_with_the_checkpoints_values():
    ckpt = _checkpoint(RUN_B)
    _check(ckpt, RUN_B)  # the same flags continue
    message = _refusal(ckpt, [*RUN_B, "--epochs", "6"])
    assert "--epochs 6, the checkpoint's 4" in message
    assert "cannot be extended with more epochs" in message and f"--initial-checkpoint {CKPT}" in message
    message = _refusal(ckpt, [*RUN_B, "--dap-interval", "2", "--dap-keep", "0.7"])
    assert "--dap-interval 2, the checkpoint's 1" in message and "--dap-keep 0.7, the checkpoint's 0.5" in message
    assert "resume with the checkpoint's flags" in message and "same --dap-* flags" not in message


def test_a_changed_selection_policy_is_refused():
    ckpt = _checkpoint(RUN_B)
    assert "--dap-select random, the checkpoint's hard" in _refusal(ckpt, [*RUN_B, "--dap-select", "random"])
    ib = [*RUN_B, "--dap-select", "infobatch"]
    message = _refusal(_checkpoint(ib), [*ib, "--infobatch-ratio", "0.3"])
    assert "--infobatch-ratio 0.3, the checkpoint's 0.5" in message
    message = _refusal(_checkpoint(ib), [*ib, "--infobatch-delta", "0.5"])
    assert "--infobatch-delta 0.5, the checkpoint's 0.875" in message
    assert "--dap-select hard, the checkpoint's infobatch" in _refusal(_checkpoint(ib), RUN_B)


def test_a_changed_seed_is_refused():
    """The resumed sampler keeps the checkpoint's seed (its order, its subsets) while the loaders would seed each
    sample's augmentation with the new one: a changed --seed, or one left out, is refused, not logged as changed."""
    seeded = [*RUN_B, "--seed", "3"]
    ckpt = _checkpoint(seeded)
    _check(ckpt, seeded)
    assert "--seed 42, the checkpoint's 3" in _refusal(ckpt, RUN_B)  # --seed left out on resume: timm's 42
    fixed = [*seeded, "--fixed-subset", "0.5", "--dap-select", "none"]
    assert "--seed 4, the checkpoint's 3" in _refusal(_checkpoint(fixed), [*fixed, "--seed", "4"])


def test_a_run_started_with_a_config_names_the_flags_it_set_and_the_config():
    """tools/pretrain.sh adds --config embedded_cifar10.yaml; resuming with `python -m dap_pretrain.train` lacks it."""
    config = str(REPO / "configs" / "pretrain" / "embedded_cifar10.yaml")
    ckpt = _checkpoint(["--config", config])
    _check(ckpt, ["--config", config, "--lr", "0.05"])
    message = _refusal(ckpt, ["--model", "cifar_resnet20"])
    assert "--epochs " in message and ", the checkpoint's 20" in message and "--dap-warmup" in message
    assert f"--config {config}" in message


def test_other_data_is_refused_naming_the_data_dir():
    ckpt = _checkpoint([*RUN_B, "--data-dir", "/data/a"], num_samples=3000)
    message = _refusal(ckpt, [*RUN_B, "--data-dir", "/data/b"], num_samples=400)
    assert "3000 samples (--data-dir /data/a)" in message and "--data-dir /data/b has 400" in message
    assert "resume with --data-dir /data/a" in message


def test_another_optimizer_or_its_parameter_groups_are_refused():
    ckpt = _checkpoint(RUN_B)
    message = _refusal(ckpt, [*RUN_B, "--opt", "adamw"])
    assert "--opt sgd" in message and "this run has --opt adamw" in message and "resume with --opt sgd" in message
    message = _refusal(ckpt, [*RUN_B, "--weight-decay", "0"])  # one parameter group instead of two
    assert "--weight-decay 0.0, the checkpoint's" in message and "optimizer" in message


def test_other_changed_flags_are_allowed_and_logged_in_one_line(caplog):
    ckpt = _checkpoint(RUN_B)
    with caplog.at_level(logging.INFO, logger="dap_pretrain.train"):
        _check(ckpt, [*RUN_B, "--lr", "0.5", "--workers", "1", "--output", "elsewhere"])
    lines = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert lines == ["resumed with flags that differ from the checkpoint's: --workers 1 (was 2), --lr 0.5 (was 0.1)"]


def test_resume_with_more_epochs_exits_2_and_leaves_the_run_folder_as_it_was(tmp_path, cifar_tiny):
    flags = ["-b", "64", "--workers", "1", "--no-plot", "--data-dir", str(cifar_tiny), "--output", str(tmp_path / "b")]
    flags += ["--epochs", "2", "--dap-warmup", "1", "--dap-keep", "0.5"]
    train_main(flags)
    out = tmp_path / "b"
    before = _files(out)
    res = _cli(*flags, "--epochs", "3", "--resume", str(out / "last.pth.tar"))
    _one_line_error(res, "--epochs 3, the checkpoint's 2", "--initial-checkpoint")
    assert _files(out) == before
    # Other images of the same count and classes: one image of two classes each moved to the other.
    other = _tree_copy(cifar_tiny, tmp_path / "other")
    a, b = sorted((other / "train").iterdir())[:2]
    fa, fb = sorted(a.iterdir())[0], sorted(b.iterdir())[0]
    fa.rename(b / f"moved_{fa.name}")  # the count per class stays; file names may repeat across classes
    fb.rename(a / f"moved_{fb.name}")
    moved = [str(other) if f == str(cifar_tiny) else f for f in flags]
    res = _cli(*moved, "--resume", str(out / "last.pth.tar"))
    _one_line_error(res, "other files than this run's --data-dir", "both 400 samples", f"--data-dir {cifar_tiny}")
    assert _files(out) == before


def _tree_copy(src: Path, dst: Path) -> Path:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    return dst


def test_the_file_digest_names_the_images_and_labels_not_where_the_tree_lies(tmp_path, cifar_tiny):
    """A moved copy of the tree digests the same; a renamed file or class folder digests otherwise (the digest is of
    names and labels, not of the images' bytes)."""
    from dap_pretrain.data.dataset import IndexedDataset, create_dataset

    def digest(root: Path) -> str | None:
        return IndexedDataset(create_dataset(name="", root=str(root), split="train", is_training=True)).file_digest()

    first = digest(cifar_tiny)
    assert first and len(first) == 16
    moved = _tree_copy(cifar_tiny, tmp_path / "moved")
    assert digest(moved) == first
    one = sorted((moved / "train").iterdir())[0]
    f = sorted(one.iterdir())[0]
    f.rename(f.with_name("renamed_" + f.name))
    assert digest(moved) != first
    f.with_name("renamed_" + f.name).rename(f)
    assert digest(moved) == first  # back as it was
    first_class = sorted((moved / "train").iterdir())[0]
    first_class.rename(first_class.with_name("zz_" + first_class.name))  # last by name: every label shifts
    assert digest(moved) != first


def test_a_folder_without_a_checkpoint_is_not_offered_resume(tmp_path):
    """A first run that failed before its first checkpoint leaves args.yaml and log.txt only."""
    out = tmp_path / "K"
    out.mkdir()
    (out / "args.yaml").write_text("epochs: 4\n")
    (out / "log.txt").write_text("failed\n")
    with pytest.raises(UsageError) as e:
        check_output_dir(out, resume="", overwrite=False)
    assert "--resume" not in str(e.value) and "--overwrite" in str(e.value) and "no last.pth.tar" in str(e.value)
    (out / "last.pth.tar").write_bytes(b"a checkpoint")
    with pytest.raises(UsageError, match=f"pass --resume {out / 'last.pth.tar'} to continue it"):
        check_output_dir(out, resume="", overwrite=False)


SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 826496 vs 826392"  # torch 2.x, 3 MB tmpfs


def test_a_short_write_by_torch_save_is_a_storage_error_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, cifar_tiny
):
    """A full disk reaches torch.save's zip writer as a RuntimeError, not an OSError (seen on a 3 MB tmpfs)."""
    real_save = torch.save

    def full_after_first_checkpoint(obj, f):
        if (Path(f).parent / "last.pth.tar").exists():
            Path(f).write_bytes(b"partial")
            raise RuntimeError(SHORT_WRITE)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", full_after_first_checkpoint)
    out = tmp_path / "run"
    flags = ["-b", "64", "--workers", "1", "--no-plot", "--data-dir", str(cifar_tiny), "--output", str(out)]
    with pytest.raises(StorageError) as e:
        train_main([*flags, "--epochs", "3", "--dap-select", "none"])
    message = str(e.value)
    assert "\n" not in message and "enforce fail" not in message and "could not write it all" in message
    assert f"continue from {out / 'last.pth.tar'} (--resume), which is intact" in message
    assert torch.load(out / "last.pth.tar", weights_only=True)["epoch"] == 1
    assert not list(out.glob(".*.tmp*"))


def test_other_runtime_errors_of_a_write_keep_their_traceback(tmp_path):
    def bug(tmp):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        write_atomic(tmp_path / "last.pth.tar", bug)
    assert list(tmp_path.iterdir()) == []


def _resume_refusal(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message and "export` only on" not in message, message
    return message


def test_weights_only_files_point_to_last_checkpoint_or_initial_checkpoint(tmp_path):
    """An export's model.safetensors / backbone.pth given to --resume."""
    from safetensors.torch import save_file

    weights = {"conv1.weight": torch.zeros(4, 3, 3, 3)}
    save_file(weights, tmp_path / "model.safetensors")
    torch.save(weights, tmp_path / "backbone.pth")
    for name in ("model.safetensors", "backbone.pth"):
        message = _resume_refusal(tmp_path / name)
        assert "OUTPUT/last.pth.tar to --resume" in message and f"--initial-checkpoint {tmp_path / name}" in message


def test_a_folder_names_its_last_checkpoint_for_resume_and_export(tmp_path):
    from dap_pretrain.export import export_backbone

    run = tmp_path / "run"
    run.mkdir()
    assert "is a folder" in _resume_refusal(run) and "does not exist" not in _resume_refusal(run)
    (run / "last.pth.tar").write_bytes(b"x")
    assert f"is a folder, not a checkpoint file; pass {run / 'last.pth.tar'}" in _resume_refusal(run)
    with pytest.raises(CheckpointError, match=f"is a folder, not a checkpoint file; pass {run / 'last.pth.tar'}"):
        export_backbone(run, tmp_path / "X")
    # a folder whose run saved no checkpoint: --resume K/last.pth.tar says why, and how to start again
    (run / "last.pth.tar").unlink()
    (run / "args.yaml").write_text("epochs: 4\n")
    message = _resume_refusal(run / "last.pth.tar")
    assert "saved none" in message and f"--output {run} --overwrite" in message


def test_an_mmengine_checkpoint_is_recognised_without_unpickling_it(tmp_path, require):
    """tools/pretrain_mm.sh's WORK_DIR/epoch_4.pth: its message hub pickles mmengine classes."""
    require("mmengine")
    from mmengine.logging import HistoryBuffer

    path = tmp_path / "epoch_4.pth"
    hub = {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {}}
    torch.save({"meta": {"epoch": 4}, "state_dict": {"backbone.w": torch.zeros(2)}, "message_hub": hub}, path)
    message = _resume_refusal(path)
    assert "an mmengine checkpoint" in message and "tools/pretrain_mm.sh" in message and "--resume" in message
    assert f"python -m dap_pretrain export {path}" in message and "Weights only" not in message


def test_a_dap_train_checkpoint_whose_paths_say_mmengine_still_resumes(tmp_path):
    """The mmengine test reads the pickle's text, and a dap-train checkpoint pickles its args: an --output such as
    runs/mmengine_vs_timm made its own run impossible to resume. It is asked only of files a safe load refuses."""
    from dap_pretrain.checkpoint import load_checkpoint

    path = tmp_path / "last.pth.tar"
    torch.save(
        {"arch": "cifar_resnet20", "state_dict": {}, "args": {"output": "runs/mmengine_vs_timm"}, "message_hub": 2},
        path,
    )
    assert load_checkpoint(path)["args"]["output"] == "runs/mmengine_vs_timm"


def test_torchs_refusal_text_is_never_repeated(tmp_path):
    """A file pickling other objects: torch's multi-line, escape-coded advice to load unsafely stays out."""
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "arch": "x", "obj": collections.OrderedDict(a=logging.getLogger)}, path)
    message = _resume_refusal(path)
    assert "unreadable" in message and "Weights only load failed" not in message and "two options" not in message
