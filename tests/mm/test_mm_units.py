"""The mmengine front end's pieces in-process, no Runner: one engine (the mm path picks the timm path's subsets),
the dap block, the scheduler rule, the timm architecture of a checkpoint, and the bad-input errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F

from dap_pretrain.data.sampler import DaPSampler
from dap_pretrain.schedule import DaPConfig


def _data_samples(indices, labels):
    from mmpretrain.structures import DataSample

    return [
        DataSample(metainfo={"sample_idx": int(i)}).set_gt_label(int(y)) for i, y in zip(indices, labels, strict=True)
    ]


def test_same_losses_pick_the_same_subsets_as_the_timm_sampler():
    """The mm path (DaPClsHead -> DaPMMSampler) and the timm path (per-sample CE -> DaPSampler) fed the same logits
    shuffle, record and choose identically, epoch after epoch; the head's loss is LinearClsHead's mean."""
    from dap_pretrain.mm import DaPClsHead, DaPMMSampler

    n, batch, classes = 64, 16, 5
    config = DaPConfig(epochs=6, warmup=1, interval=1, keep=0.7, reuse=(4,))
    mm = DaPMMSampler(list(range(n)), seed=3)
    mm.configure(config=config, select="hard")
    timm_side = DaPSampler(n, config=config, seed=3)
    torch.manual_seed(0)
    head = DaPClsHead(num_classes=classes, in_channels=8)
    head.attach(mm)
    labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(1))
    for epoch in range(config.epochs):
        mm.set_epoch(epoch)
        timm_side.set_epoch(epoch)
        order = mm.indices()
        assert torch.equal(order, timm_side.indices())
        for start in range(0, order.numel(), batch):
            idx = order[start : start + batch]
            feats = torch.randn(idx.numel(), 8, generator=torch.Generator().manual_seed(epoch * 1000 + start))
            loss = head.loss((feats,), _data_samples(idx, labels[idx]))["loss"]
            logits = head((feats,)).detach()
            timm_side.record(idx, F.cross_entropy(logits, labels[idx], reduction="none"))
            assert torch.allclose(loss, F.cross_entropy(logits, labels[idx]))
        a, b = mm.end_epoch(), timm_side.end_epoch()
        assert (a.event, a.size_before, a.size_after, a.seen) == (b.event, b.size_before, b.size_after, b.seen)
        assert torch.equal(mm.subset, timm_side.subset)
    assert mm.subset.numel() < n  # the run dropped after the reuse at epoch 4


def test_head_refuses_mixed_targets_and_missing_sample_idx():
    from mmpretrain.structures import DataSample

    from dap_pretrain.mm import DaPClsHead, DaPMMError

    head = DaPClsHead(num_classes=3, in_channels=4)
    head.attach(DaPSampler(4))
    feats = (torch.randn(2, 4),)
    mixed = [DataSample(metainfo={"sample_idx": i}).set_gt_score(torch.tensor([0.5, 0.5, 0.0])) for i in (0, 1)]
    with pytest.raises(DaPMMError, match=r"mixed \(gt_score\) outside the data preprocessor's batch_augments"):
        head.loss(feats, mixed)
    with pytest.raises(DaPMMError, match="sample_idx"):
        head.loss(feats, [DataSample().set_gt_label(0), DataSample().set_gt_label(1)])
    head.detach()  # detached: stock LinearClsHead, no recording
    assert "loss" in head.loss(feats, mixed)


def test_dap_block_resolves_like_the_timm_trainer():
    from dap_pretrain.mm import DaPMMError, resolve_dap

    block = dict(warmup=10, interval=2, keep=0.9, active=10, reuse=None, select="hard", seed=None)
    s = resolve_dap(block, epochs=120, milestones=(30, 60, 90, 200))  # reuse None: the LR milestones within 1..E
    assert s.config == DaPConfig(epochs=120, warmup=10, interval=2, keep=0.9, active=10, reuse=(30, 60, 90))
    assert s.to_dict()["select"] == "hard" and s.to_dict()["reuse"] == [30, 60, 90]
    assert resolve_dap({**block, "reuse": []}, epochs=120, milestones=(30,)).config.reuse == ()
    for bad, match in (
        ({**block, "keep": 1.5}, r"^dap\.keep=1\.5 is invalid"),  # the config key, not a flag (--dap.keep was shown)
        ({**block, "reuse": [130]}, r"dap\.reuse"),
        ({**block, "select": "easy"}, r"dap\.select"),
        ({**block, "kep": 0.5}, "unknown dap keys"),
        (None, "no `dap = dict"),
        ({**block, "warmup": 200}, r"^dap\.warmup=200 is invalid"),
    ):
        with pytest.raises(DaPMMError, match=match):
            resolve_dap(bad, epochs=120)


def test_iteration_schedulers_only_within_the_dap_warmup():
    """A converted (iteration-based) LR warm-up is exact while every epoch trains on all data; past that, refused."""
    from mmengine.optim.scheduler import LinearLR, MultiStepLR

    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.hook import check_schedulers, lr_milestones

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    steps = MultiStepLR(opt, milestones=[30, 60, 90], by_epoch=True)
    warm = LinearLR.build_iter_from_epoch(opt, start_factor=0.1, begin=0, end=5, epoch_length=13)
    assert lr_milestones([warm, steps]) == (30, 60, 90)
    check_schedulers([warm, steps], warmup=5, epoch_len=13)  # ends at iteration 65 = 5 full epochs: allowed
    with pytest.raises(DaPMMError, match=r"LinearLR counts iterations .* use by_epoch=True"):
        check_schedulers([warm, steps], warmup=4, epoch_len=13)
    native = MultiStepLR(opt, milestones=[100], by_epoch=False)  # no end: counts iterations for the whole run
    with pytest.raises(DaPMMError, match="no end"):
        check_schedulers([native], warmup=10, epoch_len=13)


def test_timm_architecture_names_the_timm_model_that_loads_the_weights():
    """mmpretrain's ResNet-18 classifier is timm's resnet18: same keys (backbone./head. prefixes off), same logits."""
    import timm
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    from dap_pretrain.mm.hook import timm_architecture

    init_default_scope("mmpretrain")
    cfg = dict(
        type="ImageClassifier",
        backbone=dict(type="ResNet", depth=18, out_indices=(3,), style="pytorch"),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="DaPClsHead", num_classes=7, in_channels=512),
    )
    model = MODELS.build(cfg).eval()
    assert timm_architecture(model) == "resnet18"
    ref = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    state = {k.removeprefix("backbone.").removeprefix("head."): v for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x, mode="tensor"), ref(x), atol=1e-5)
    assert timm_architecture(MODELS.build({**cfg, "backbone": {**cfg["backbone"], "type": "ResNetV1c"}})) is None


def test_a_work_dir_lock_file_removed_before_it_was_locked_is_locked_again(tmp_path, monkeypatch):
    """A refused start's restore removes the .dap.lock it made. If that happens between another start's open and
    its flock, the second held a lock on a removed file while a third could lock the new one: it locks again."""
    import fcntl
    import os

    from dap_pretrain.mm import work_dir as wd

    work = tmp_path / "w"
    real_flock, calls = fcntl.flock, []

    def flock_after_the_other_start_left(f, op):
        calls.append(op)
        if len(calls) == 1:
            (work / ".dap.lock").unlink()  # what WorkDirSnapshot.restore of the refused start does
        return real_flock(f, op)

    monkeypatch.setattr(wd.fcntl, "flock", flock_after_the_other_start_left)
    with wd.work_dir_lock(work, enabled=True):
        held = [
            int(fd)
            for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".dap.lock")
        ]
        assert len(calls) == 2 and [os.fstat(fd).st_ino for fd in held] == [os.stat(work / ".dap.lock").st_ino]


def test_bad_inputs_are_one_line_errors(tmp_path):
    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.runner import set_data_root
    from dap_pretrain.mm.work_dir import check_work_dir, work_dir_lock

    work = tmp_path / "w"
    with work_dir_lock(work, enabled=True):
        with pytest.raises(DaPMMError, match="in use by another run"):
            with work_dir_lock(work, enabled=True):
                pass
    (work / "run.json").write_text("{}")
    with pytest.raises(DaPMMError, match="already holds a run") as e:  # no checkpoint: --resume would be refused
        check_work_dir(work, resume=False, overwrite=False)
    assert "--resume" not in str(e.value) and "--overwrite" in str(e.value)
    (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
    with pytest.raises(DaPMMError, match="--resume to continue it"):
        check_work_dir(work, resume=False, overwrite=False)
    check_work_dir(work, resume=True, overwrite=False)
    with pytest.raises(DaPMMError, match="is a file; pass a folder"):  # was a FileExistsError traceback at the lock
        check_work_dir(work / "run.json", resume=False, overwrite=False)
    with pytest.raises(DaPMMError, match=r"is under .*run.json, which is a file"):  # was NotADirectoryError
        check_work_dir(work / "run.json" / "sub", resume=False, overwrite=False)
    (work / ".replaced").mkdir()  # an --overwrite killed before its first checkpoint: the old run is kept there
    with pytest.raises(DaPMMError, match=r"killed before its first checkpoint; the run it was replacing is kept in "):
        check_work_dir(work, resume=False, overwrite=False)
    check_work_dir(work, resume=False, overwrite=True)
    for split, cls in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "c")):
        (tmp_path / "data" / split / cls).mkdir(parents=True)
        (tmp_path / "data" / split / cls / "x.jpg").write_bytes(b"")
    with pytest.raises(DaPMMError, match="different class folders"):
        set_data_root(None, tmp_path / "data")
    with pytest.raises(DaPMMError, match="no train/ folder"):
        set_data_root(None, tmp_path / "data" / "train")


def test_configs_mmengine_cannot_read_or_without_a_head_are_one_line(tmp_path):
    """A syntax error, a JSON file that is not JSON, and a config without model.head were tracebacks (exit 1),
    --check included."""
    from mmengine.config import Config

    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.runner import load_config, set_data_root

    (tmp_path / "syntax.py").write_text("model = dict(type='X'\n")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(DaPMMError, match=r"syntax.py is not valid Python \(line 1: '\(' was never closed\)"):
        load_config(tmp_path / "syntax.py")
    with pytest.raises(DaPMMError, match=r"bad.json cannot be read \(JSONDecodeError: Expecting value"):
        load_config(tmp_path / "bad.json")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            (tmp_path / "data" / split / cls / "x.jpg").write_bytes(b"")
    for model in (1, dict(type="ImageClassifier")):
        with pytest.raises(DaPMMError, match=r"the config has no model.head \(a classifier's\); start from one"):
            set_data_root(Config(dict(model=model)), tmp_path / "data")


@pytest.mark.parametrize(
    "option, expect",
    [
        ("train_dataloader.batchsize=4", "train_dataloader.batchsize is not a data loader setting (did you mean "
         "train_dataloader.batch_size?)"),
        ("val_dataloader.batch_size=abc", "val_dataloader.batch_size='abc' is not an integer >= 1"),
        ("test_dataloader.num_workers=-1", "test_dataloader.num_workers=-1 is not an integer >= 0"),
    ],
)  # fmt: skip
def test_data_loader_settings_torch_would_refuse_are_one_line_before_the_run(cifar_tiny, tmp_path, option, expect):
    """A misspelled or mistyped *_dataloader key passed --check, then torch's DataLoader refused it with a
    traceback when mmengine built the loader (the test loader only after training). The stock configs pass."""
    from mmengine.config import DictAction

    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.runner import prepare_config

    options = DictAction._parse_iterable(option.split("=", 1)[1])  # the value as --cfg-options parses it
    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "mmpretrain").glob("*.py"))
    common = dict(data_root=cifar_tiny, work_dir=tmp_path / "w")
    with pytest.raises(DaPMMError) as e:
        prepare_config(config=configs[0], **common, cfg_options={option.split("=", 1)[0]: options})
    assert str(e.value).startswith(expect) and str(e.value).endswith("in --cfg-options"), str(e.value)
    for config in configs:
        prepare_config(config=config, **common)
    assert not (tmp_path / "w").exists()


def test_a_moved_work_dir_resumes_from_its_own_checkpoint(tmp_path):
    """mmengine's last_checkpoint holds an absolute path: in a copied work dir it names the original (here gone),
    and --resume was refused with 'does not exist'. The copy's own file of that name is used; none is one line."""
    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.work_dir import last_checkpoint_in

    work = tmp_path / "moved"
    work.mkdir()
    (work / "last_checkpoint").write_text(str(tmp_path / "original" / "epoch_3.pth"))
    (work / "epoch_3.pth").write_bytes(b"weights")
    assert last_checkpoint_in(work, fix="pass --resume CKPT") == work / "epoch_3.pth"
    (work / "epoch_3.pth").unlink()
    with pytest.raises(DaPMMError, match="outside this work dir, and the work dir has no epoch_3.pth; pass --resume"):
        last_checkpoint_in(work, fix="pass --resume CKPT")
    (work / "last_checkpoint").write_text(str(work / "epoch_2.pth"))  # in place: returned as named
    assert last_checkpoint_in(work, fix="") == work / "epoch_2.pth"
    assert last_checkpoint_in(tmp_path, fix="") is None


def _config(tmp_path, body: str = "", *, name: str = "c.py"):
    """A config inheriting the repo's ResNet-18 DaP config plus ``body``, loaded as the entry point loads it."""
    from dap_pretrain.mm.runner import load_config

    repo = Path(__file__).resolve().parents[2]
    path = tmp_path / name
    path.write_text(f"_base_ = ['{repo}/configs/mmpretrain/resnet18_dap75_in1k.py']\n{body}\n")
    cfg = load_config(path)
    cfg.work_dir = str(tmp_path / "work")
    return cfg


def _with_data(cfg, root):
    from dap_pretrain.mm.runner import set_data_root

    for split, cls in (("train", "a"), ("val", "a")):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        (root / split / cls / "x.jpg").write_bytes(b"")
    set_data_root(cfg, root)
    return cfg


def test_mixup_configs_pass_the_check_and_untraced_mixing_is_only_counted(tmp_path):
    """Mixup/CutMix in train_cfg.augments pass the config check for every dap.select (the hook traces them); a
    mixed batch that reaches the head without weights is recorded against its images' indices when losses only
    count the samples trained."""
    from mmpretrain.structures import DataSample

    from dap_pretrain.mm import DaPClsHead
    from dap_pretrain.mm.runner import check_config

    mix = "model = dict(train_cfg=dict(augments=[dict(type='Mixup', alpha=0.2), dict(type='CutMix', alpha=1.0)]))"
    for select in ("hard", "none", "random"):
        assert check_config(_with_data(_config(tmp_path, f"{mix}\ndap = dict(select='{select}')"), tmp_path / "d"))
    head = DaPClsHead(num_classes=3, in_channels=4)
    sampler = DaPSampler(4)
    head.attach(sampler, ranked=False)
    mixed = [DataSample(metainfo={"sample_idx": i}).set_gt_score(torch.tensor([0.5, 0.5, 0.0])) for i in (0, 2)]
    loss = head.loss((torch.randn(2, 4),), mixed)["loss"]
    assert torch.isfinite(loss) and sampler.recorder.seen().tolist() == [True, False, True, False]


def _mixed_batch(augments: list, *, n=6, classes=4, smoothing=0.0, seed=0, loss=None):
    """A batch through mmpretrain's own ClsDataPreprocessor with ``augments`` traced, and a DaPClsHead attached to a
    recorder: returns (head, recorded own losses, the images' losses, the weights, labels)."""
    from mmpretrain.models.utils import ClsDataPreprocessor
    from mmpretrain.structures import DataSample

    from dap_pretrain.mm import DaPClsHead
    from dap_pretrain.mm.head import TracedBatchAugments

    torch.manual_seed(seed)
    numpy.random.seed(seed)  # mmpretrain draws lam from numpy's global generator
    pre = ClsDataPreprocessor(num_classes=classes, batch_augments=dict(augments=augments))
    pre.batch_augments = traced = TracedBatchAugments(pre.batch_augments)
    labels = torch.tensor([0, 1, 2, 3, 1, 0][:n])
    samples = [DataSample(metainfo={"sample_idx": 10 + i}).set_gt_label(int(y)) for i, y in enumerate(labels)]
    data = pre({"inputs": [torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8) for _ in range(n)],
                "data_samples": samples}, training=True)  # fmt: skip
    if smoothing:
        loss = dict(type="LabelSmoothLoss", label_smooth_val=smoothing, mode="original")
    head = DaPClsHead(num_classes=classes, in_channels=5, **({"loss": loss} if loss else {}))
    recorded = {}

    class Recorder:
        def record(self, indices, losses):
            recorded.update(zip(indices.tolist(), losses.tolist(), strict=True))

    head.attach(Recorder(), ranked=True, mixing=traced)
    feats = torch.randn(n, 5)
    weights = traced._weights.clone()
    head.loss((feats,), data["data_samples"])
    own = torch.tensor([recorded[10 + i] for i in range(n)])
    scores = torch.stack([s.gt_score for s in data["data_samples"]])
    per_image = head.loss_module(head.fc(feats), scores, reduction_override="none").reshape(n, -1).sum(1)
    return own, per_image.detach(), weights, labels, head.fc(feats).detach()


@pytest.mark.parametrize("augment", [dict(type="Mixup", alpha=1.0), dict(type="CutMix", alpha=1.0)])
def test_traced_mixing_gives_mmpretrains_permutation_and_splits_the_loss_by_sample(augment):
    own, per_image, weights, labels, logits = _mixed_batch([augment], smoothing=0.1)
    assert torch.allclose(weights.sum(1), torch.ones(6))  # each image is a convex mix of samples
    lam = weights.diagonal()
    off = weights - torch.diag(lam)
    moved = off.sum(1) > 0  # a sample the permutation left in place is its own partner: weight 1
    partner = torch.where(moved, off.argmax(1), torch.arange(6))
    assert sorted(partner.tolist()) == list(range(6)) and moved.sum() >= 2  # a permutation, as mmpretrain draws
    assert torch.allclose(lam[moved], lam[moved][0].expand(int(moved.sum()))) and torch.all(lam[~moved] == 1)
    assert 0 < float(lam[moved][0]) < 1  # one lam per batch
    assert float(own.sum()) == pytest.approx(float(per_image.sum()), rel=1e-5)
    # by hand, with label smoothing 0.1 as LabelSmoothLoss applies it
    smooth = lambda c: F.one_hot(torch.tensor(c), 4).float() * 0.9 + 0.1 / 4  # noqa: E731
    ce = lambda i, c: float(-(smooth(c) * logits[i].log_softmax(0)).sum())  # noqa: E731
    j = int(torch.nonzero(moved)[0])
    i = int((partner == j).nonzero()[0])  # the image that carries sample j as partner
    expected = float(lam[j]) * ce(j, int(labels[j])) + float(weights[i, j]) * ce(i, int(labels[j]))
    assert float(own[j]) == pytest.approx(expected, rel=1e-5)
    assert not torch.allclose(own, per_image)


@pytest.mark.parametrize(
    "loss",
    [
        dict(type="FocalLoss"),
        dict(type="AsymmetricLoss"),
        dict(type="LabelSmoothLoss", label_smooth_val=0.1, mode="multi_label", use_sigmoid=True),
    ],
)
def test_a_loss_that_cannot_be_split_is_refused_on_the_first_mixed_batch(loss):
    from dap_pretrain.mm import DaPMMError

    with pytest.raises(DaPMMError, match=f"{loss['type']} is not linear in its target"):
        _mixed_batch([dict(type="Mixup", alpha=1.0)], loss=loss)


def test_linear_losses_split_exactly():
    for loss in (
        dict(type="CrossEntropyLoss", use_soft=True),
        dict(type="CrossEntropyLoss", use_sigmoid=True),
        dict(type="LabelSmoothLoss", label_smooth_val=0.2, mode="classy_vision"),
    ):
        own, per_image, *_ = _mixed_batch([dict(type="CutMix", alpha=1.0)], loss=loss)
        assert float(own.sum()) == pytest.approx(float(per_image.sum()), rel=1e-5), loss


def test_a_batch_the_random_choice_leaves_unmixed_has_identity_weights():
    from mmpretrain.models.utils import RandomBatchAugment

    from dap_pretrain.mm.head import TracedBatchAugments

    traced = TracedBatchAugments(RandomBatchAugment([dict(type="Mixup", alpha=1.0)], probs=[0.0]))
    onehot = F.one_hot(torch.tensor([0, 1, 2]), 3)
    _, scores = traced(torch.zeros(3, 3, 4, 4), onehot)
    assert torch.equal(traced.take(), torch.eye(3)) and traced.take() is None  # handed over once
    assert torch.equal(scores, onehot.float())


def test_head_refusal_names_a_fix_that_works(tmp_path):
    """A non-linear ClsHead is told that DaPClsHead replaces LinearClsHead only, and the mixin it names works."""
    from mmpretrain.models.heads import VisionTransformerClsHead

    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.head import DaPLossMixin
    from dap_pretrain.mm.runner import check_config

    vit = "model = dict(head=dict(type='VisionTransformerClsHead', hidden_dim=8))"
    with pytest.raises(
        DaPMMError, match=r"DaPClsHead replaces LinearClsHead only .*\(DaPLossMixin, VisionTransformerClsHead\)"
    ):
        check_config(_with_data(_config(tmp_path, vit), tmp_path / "d"))
    with pytest.raises(DaPMMError, match=r"is 'LinearClsHead'; set it to 'DaPClsHead'"):
        check_config(_with_data(_config(tmp_path, "model = dict(head=dict(type='LinearClsHead'))"), tmp_path / "d"))

    class DaPViTHead(DaPLossMixin, VisionTransformerClsHead):
        pass

    head = DaPViTHead(num_classes=3, in_channels=4, hidden_dim=8)
    sampler = DaPSampler(4)
    head.attach(sampler)
    head.loss((torch.randn(2, 4),), _data_samples([1, 3], [0, 2]))
    assert sampler.recorder.seen().tolist() == [False, True, False, True]


def test_missing_data_path_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.runner import check_config

    monkeypatch.chdir(tmp_path)  # the stock config's data/imagenet is relative to the working directory
    with pytest.raises(DaPMMError, match=r"train_dataloader.dataset: data/imagenet does not exist .* --data-root"):
        check_config(_config(tmp_path))


def test_resume_mismatch_names_the_key_that_differs():
    from dap_pretrain.mm.settings import resolve_dap, resume_mismatch

    block = dict(warmup=1, interval=1, keep=0.5, reuse=[])
    saved = {"config": resolve_dap(block, epochs=4).config.to_dict(), "select": "hard"}
    assert resume_mismatch(saved, resolve_dap(block, epochs=4)) is None
    msg = resume_mismatch(saved, resolve_dap(block, epochs=6))
    assert "train_cfg.max_epochs=4, this run has train_cfg.max_epochs=6" in msg and "dap block" not in msg
    msg = resume_mismatch(saved, resolve_dap({**block, "keep": 0.7}, epochs=4))
    assert "dap.keep=0.5, this run has dap.keep=0.7" in msg
    # dap.seed: was ignored silently (the checkpoint's went on); left unset, the checkpoint's goes on as before
    saved["seed"] = 3
    assert resume_mismatch(saved, resolve_dap(block, epochs=4)) is None
    assert resume_mismatch(saved, resolve_dap({**block, "seed": 3}, epochs=4)) is None
    msg = resume_mismatch(saved, resolve_dap({**block, "seed": 4}, epochs=4))
    assert "dap.seed=3, this run has dap.seed=4" in msg


def test_overwrite_deletes_only_the_previous_runs_files(tmp_path):
    from dap_pretrain.mm.work_dir import previous_run_files

    names = ["epoch_3.pth", "best_accuracy_top1_epoch_2.pth", "last_checkpoint", "run.json", "summary.csv"]
    names += [".run.json.tmp", "c.py", "notes.txt", "pretrained.pth"]
    for name in names:
        (tmp_path / name).write_text("x")
    for folder in ("20261127_061035", "20261127_070000", "mine"):
        (tmp_path / folder).mkdir()
    got = [p.name for p in previous_run_files(tmp_path, keep=("20261127_070000",))]
    assert got == sorted(names[:6] + ["20261127_061035"])


def test_overwrite_keeps_the_previous_run_until_the_first_checkpoint(tmp_path):
    """--overwrite deleted the previous run in before_train, so a run failing in its first epoch left neither. Its
    files now wait in .replaced/: back if the run stops before a checkpoint, gone once one is saved."""
    from types import SimpleNamespace

    from dap_pretrain.mm.work_dir import ClearPreviousRun

    runner = SimpleNamespace(logger=SimpleNamespace(info=lambda message: None))
    for attempt in ("fails", "saves"):
        work = tmp_path / attempt
        (work / "20261127_061035").mkdir(parents=True)  # the previous run's log folder
        old = {"epoch_4.pth": "old weights", "last_checkpoint": "old pointer", "run.json": "old", "notes.txt": "mine"}
        for name, text in old.items():
            (work / name).write_text(text)
        hook = ClearPreviousRun(work_dir=work, keep=("20261127_070000",))
        hook.before_train(runner)
        assert sorted(p.name for p in (work / ".replaced").iterdir()) == sorted(
            ["20261127_061035", "epoch_4.pth", "last_checkpoint", "run.json"]
        )
        (work / "20261127_070000").mkdir()  # the new run's log folder, kept either way
        (work / "epoch_1.pth").write_text("new weights")
        if attempt == "fails":
            hook.after_train_epoch(runner)  # no last_checkpoint yet: nothing dropped
            hook.undo()
            assert {n: (work / n).read_text() for n in old} == old and not (work / "epoch_1.pth").exists()
            assert (work / "20261127_061035").is_dir() and not (work / ".replaced").exists()
        else:
            (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
            hook.after_train_epoch(runner)
            hook.undo()  # nothing left to undo
            assert not (work / ".replaced").exists() and not (work / "epoch_4.pth").exists()
            assert (work / "epoch_1.pth").read_text() == "new weights" and (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("item", ["foo", "=3", "a=[1,2"])
def test_bad_cfg_options_are_one_line(item, capsys):
    from dap_pretrain.mm.train import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["c.py", "--cfg-options", "x=1", item])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and item in err
    assert err.startswith("pretrain_mm: error: --cfg-options")


@pytest.mark.parametrize("module", ["dap_pretrain.mm.train", "downstream.transfer"])
def test_launcher_pytorch_outside_torchrun_is_one_line(module, monkeypatch, capsys):
    """Was mmengine's KeyError traceback (LOCAL_RANK) from init_dist; under torchrun's variables it parses."""
    import importlib

    parse_args = importlib.import_module(module).parse_args
    argv = ["c.py"] if module.endswith("train") else ["faster_rcnn", "bb"]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as e:
        parse_args([*argv, "--launcher", "pytorch"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--launcher pytorch needs torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK" in err
    assert ("tools/pretrain_mm.sh" if module.endswith("train") else "tools/transfer_coco.sh --gpus N") in err
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    assert parse_args([*argv, "--launcher", "pytorch"]).launcher == "pytorch"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name)
    assert parse_args([*argv, "--launcher", "pytorch", "--check"]).check  # the scripts' one-process check


def test_resume_of_a_file_that_is_no_mmengine_checkpoint_is_one_line(tmp_path):
    """A corrupt file was torch's traceback; a dap-train last.pth.tar passed this check and failed inside mmengine."""
    from mmengine.config import Config

    from dap_pretrain.mm import DaPMMError
    from dap_pretrain.mm.runner import check_resume
    from dap_pretrain.mm.settings import resolve_dap

    settings = resolve_dap(dict(warmup=1, interval=1, keep=0.5, reuse=[]), epochs=4)
    corrupt = tmp_path / "epoch_2.pth"
    corrupt.write_bytes(b"not a checkpoint")
    timm_side = tmp_path / "last.pth.tar"
    torch.save({"arch": "resnet18", "sampler": {}, "state_dict": {}, "epoch": 2}, timm_side)
    for path, words in ((corrupt, "is not a readable checkpoint"), (timm_side, "tools/pretrain.sh --resume")):
        cfg = Config(dict(resume=True, load_from=str(path), work_dir=str(tmp_path)))
        with pytest.raises(DaPMMError, match=words) as e:
            check_resume(cfg, settings)
        assert "\n" not in str(e.value)


def _prepared(tmp_path, body: str = "", **flags):
    """``prepare_config`` on a config inheriting the repo's ResNet-18 one, as the entry point calls it."""
    from dap_pretrain.mm.runner import prepare_config

    repo = Path(__file__).resolve().parents[2]
    path = tmp_path / "p.py"
    path.write_text(f"_base_ = ['{repo}/configs/mmpretrain/resnet18_dap75_in1k.py']\n{body}\n")
    return prepare_config(config=path, work_dir=tmp_path / "work", **flags)


def test_mmpretrain_train_py_defaults_and_flags(tmp_path, monkeypatch):
    """What mmpretrain's tools/train.py adds to a config: loader defaults (config values win), --amp, --no-validate,
    --auto-scale-lr, --no-pin-memory, --no-persistent-workers."""
    cfg = _prepared(tmp_path, "val_dataloader = dict(pin_memory=False)")
    train = cfg.train_dataloader
    assert train.pin_memory and train.persistent_workers and train.collate_fn == dict(type="default_collate")
    assert cfg.val_dataloader.pin_memory is False  # the config's own value stays
    assert cfg.optim_wrapper.get("type", "OptimWrapper") == "OptimWrapper" and cfg.val_cfg is not None
    cfg = _prepared(tmp_path, "train_dataloader = dict(num_workers=0)")
    assert cfg.train_dataloader.persistent_workers is False  # torch refuses persistent workers without workers
    from dap_pretrain.mm import runner
    from dap_pretrain.mm.settings import DaPMMError

    with pytest.raises(DaPMMError, match="--amp: mmengine's AmpOptimWrapper needs a CUDA GPU"):
        _prepared(tmp_path, amp=True)  # this machine has none (the CI's); mmengine would raise a traceback later
    monkeypatch.setattr(runner, "_cuda", lambda: True)
    cfg = _prepared(tmp_path, amp=True, validate=False, auto_scale_lr=True, pin_memory=False, persistent_workers=False)
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.loss_scale == "dynamic"
    assert cfg.val_cfg is None and cfg.val_dataloader is None and cfg.val_evaluator is None
    assert cfg.auto_scale_lr.enable is True
    assert not cfg.train_dataloader.pin_memory and not cfg.train_dataloader.persistent_workers


def test_cfg_options_merge_last_as_in_mmpretrain(tmp_path, cifar_tiny):
    """--cfg-options merge after --data-root and --work-dir, as in mmpretrain's tools/train.py: an option beats
    --work-dir and --data-root's dataset keys and class count (before, --data-root silently replaced them); the
    flags then apply to the merged config."""
    options = {
        "work_dir": str(tmp_path / "from_options"),
        "train_dataloader.dataset.data_prefix": "val",
        "train_dataloader.pin_memory": True,
        "model.head.num_classes": 7,
    }
    cfg = _prepared(tmp_path, data_root=cifar_tiny, cfg_options=options, pin_memory=False)
    assert cfg.work_dir == str(tmp_path / "from_options")
    assert cfg.train_dataloader.dataset.data_prefix == "val" and cfg.train_dataloader.dataset.type == "CustomDataset"
    assert cfg.train_dataloader.dataset.data_root == str(cifar_tiny.resolve())  # --data-root's, not overridden
    assert cfg.train_dataloader.pin_memory is False  # --no-pin-memory applies to the merged config: the flag wins
    assert cfg.model.head.num_classes == 7
    # the flags and loader defaults apply to the merged config: persistent workers follow the options' workers
    cfg = _prepared(tmp_path, "train_dataloader = dict(num_workers=2)", cfg_options={"train_dataloader.num_workers": 0})
    assert cfg.train_dataloader.persistent_workers is False  # torch refuses persistent workers without workers
    cfg = _prepared(tmp_path, "train_dataloader = dict(num_workers=0)", cfg_options={"train_dataloader.num_workers": 4})
    assert cfg.train_dataloader.persistent_workers is True  # as mmpretrain gives
    cfg = _prepared(tmp_path, cfg_options={"val_dataloader.batch_size": 8}, validate=False)  # no mmengine TypeError
    assert cfg.val_dataloader is None and cfg.val_cfg is None
    for empty in ("", "None", None):  # an empty work_dir option keeps --work-dir
        assert _prepared(tmp_path, cfg_options={"work_dir": empty}).work_dir == str(tmp_path / "work")
    cfg = _prepared(tmp_path, data_root=cifar_tiny)  # without options: the flags' values
    assert cfg.work_dir == str(tmp_path / "work") and cfg.model.head.num_classes == 10
    assert cfg.train_dataloader.dataset.data_prefix == "train"


def test_ema_hooks_that_validate_the_ema_weights():
    import mmengine.hooks
    import mmpretrain.engine.hooks

    from dap_pretrain.mm.hook import ema_validates, origin_validates

    assert ema_validates([mmengine.hooks.EMAHook(), mmengine.hooks.CheckpointHook()])
    assert ema_validates([mmpretrain.engine.hooks.EMAHook()])  # evaluate_on_ema=True by default
    assert ema_validates([mmpretrain.engine.hooks.EMAHook(evaluate_on_ema=True, evaluate_on_origin=True)])
    assert not ema_validates([mmpretrain.engine.hooks.EMAHook(evaluate_on_ema=False)])  # raw weights validated
    assert not ema_validates([mmengine.hooks.CheckpointHook()])
    assert origin_validates([mmpretrain.engine.hooks.EMAHook(evaluate_on_origin=True)])
    assert not origin_validates([mmpretrain.engine.hooks.EMAHook()])  # the EMA weights only
    assert not origin_validates([mmpretrain.engine.hooks.EMAHook(evaluate_on_ema=False)])  # the raw ones only
    assert not origin_validates([mmengine.hooks.EMAHook()])


@pytest.mark.parametrize(
    ("ema", "origin", "expected"),
    [
        (False, False, (71.0, 90.0, None, None)),  # no EMA: the validated figures are the raw weights'
        (True, False, (None, None, 71.0, 90.0)),  # the EMA weights validated, the raw ones never
        (True, True, (65.0, 88.0, 71.0, 90.0)),  # both, the raw weights' logged as ..._origin
    ],
)
def test_run_summary_says_whose_top1(ema, origin, expected):
    """run.json's top1/top5 are the raw weights' and ema_top1/ema_top5 the EMA's, from the last validated epoch;
    a figure that was never measured is None."""
    from types import SimpleNamespace

    from dap_pretrain.mm.hook import DaPHook
    from dap_pretrain.reporting import Accounting

    hook = DaPHook()
    hook.settings = SimpleNamespace(config=SimpleNamespace(epochs=3), to_dict=dict)
    hook.acct = Accounting(num_samples=10, baseline_epochs=3, planned=25, measured=20)
    extra = {"eval_top1_origin": None, "eval_top5_origin": None} if origin else {}
    hook.acct.history = [
        {"epoch": 1, "eval_top1": 50.0, "eval_top5": 80.0, **extra},
        {"epoch": 2, "eval_top1": 71.0, "eval_top5": 90.0, **extra},
        {"epoch": 3, "eval_top1": None, "eval_top5": None, **extra},  # not validated
    ]
    if origin:
        hook.acct.history[1].update(eval_top1_origin=65.0, eval_top5_origin=88.0)
    hook._ema_validates, hook._origin_validates = ema, origin
    run = hook.run_summary()
    assert (run["top1"], run["top5"], run["ema_top1"], run["ema_top5"]) == expected


def test_refusals_every_rank_makes_alike_are_marked_so(tmp_path):
    """DaPHook.before_train and pretrain_mm's checks before the runner is built refuse from the config, data root,
    checkpoint and work dir, which every rank reads alike: marked, they are printed once per node under torchrun
    (they were once per process)."""
    from types import SimpleNamespace

    from mmengine.runner import IterBasedTrainLoop

    from dap_pretrain.mm.hook import DaPHook
    from dap_pretrain.mm.settings import DaPMMError

    runner = SimpleNamespace(cfg={}, train_loop=IterBasedTrainLoop.__new__(IterBasedTrainLoop))
    with pytest.raises(DaPMMError, match="epoch-based train loop") as e:
        DaPHook().before_train(runner)
    assert e.value.every_rank
    # and those before the runner is built (2 processes started by torchrun itself, not tools/pretrain_mm.sh)
    from dap_pretrain.mm.runner import pretrain_mm

    config = Path(__file__).resolve().parents[2] / "configs/mmpretrain/resnet18_dap75_in1k.py"
    with pytest.raises(DaPMMError, match="model.head.type is 'LinearClsHead'") as e:
        pretrain_mm(config=config, work_dir=tmp_path / "w", cfg_options={"model.head.type": "LinearClsHead"})
    assert e.value.every_rank and not (tmp_path / "w").exists()


def test_config_fields_dap_cannot_honour_are_one_line_or_translated(tmp_path, monkeypatch):
    from dap_pretrain.mm.runner import check_config
    from dap_pretrain.mm.settings import DaPMMError

    cfg = _with_data(_prepared(tmp_path, "train_dataloader = dict(sampler=dict(round_up=True))"), tmp_path / "d")
    check_config(cfg)
    assert "round_up" not in cfg.train_dataloader.sampler and not cfg.train_dataloader.sampler.get("drop_last")
    for body, words in (
        ("train_dataloader = dict(sampler=dict(round_up=False))", "round_up=False (uneven shards)"),
        ("train_dataloader = dict(sampler=dict(shuffle_seed=1))", "['shuffle_seed'], which DaPMMSampler does not"),
        ("runner_type = 'FlexibleRunner'", "runner_type='FlexibleRunner': DaPHook drives mmengine's Runner"),
        ("default_hooks = dict(checkpoint=dict(by_epoch=False, interval=50))", "checkpoint.by_epoch=False"),
    ):
        with pytest.raises(DaPMMError, match=re.escape(words)):
            check_config(_with_data(_prepared(tmp_path, body), tmp_path / "d"))
    monkeypatch.setattr("dap_pretrain.mm.runner._cuda", lambda: True)
    with pytest.raises(DaPMMError, match="--amp replaces optim_wrapper.type"):
        _prepared(tmp_path, "optim_wrapper = dict(type='Custom')", amp=True)
    options = {"optim_wrapper.type": "OptimWrapper"}  # an option that sets the type back is seen by --amp
    cfg = _prepared(tmp_path, "optim_wrapper = dict(type='Custom')", amp=True, cfg_options=options)
    assert cfg.optim_wrapper.type == "AmpOptimWrapper"


def test_a_steplr_schedule_needs_dap_reuse_set(tmp_path):
    """dap.reuse=None follows MultiStepLR's few decays; a StepLR decays every step_size epochs (mmpretrain's every
    epoch or two), which would pick all data back up nearly every epoch, so it needs dap.reuse given."""
    from dap_pretrain.mm.runner import check_config
    from dap_pretrain.mm.settings import DaPMMError

    step = "param_scheduler = dict(_delete_=True, type='StepLR', by_epoch=True, step_size=30, gamma=0.1)"
    with pytest.raises(DaPMMError, match=r"StepLR decays every 30 epochs \(\[30, 60, 90\]\) and dap.reuse is unset"):
        check_config(_with_data(_prepared(tmp_path, step), tmp_path / "d"))
    settings = check_config(_with_data(_prepared(tmp_path, step + "\ndap = dict(reuse=[30, 60])"), tmp_path / "d"))
    assert settings.config.reuse == (30, 60)


def test_resume_with_nothing_to_resume_starts_a_new_run(tmp_path, capsys):
    """mmpretrain's --resume on a work dir without a checkpoint trains from scratch (a requeued job's first start);
    a work dir that holds a run but no last_checkpoint is still refused in one line."""
    from dap_pretrain.mm.settings import DaPMMError

    cfg = _prepared(tmp_path, resume="auto")
    assert not cfg.get("resume") and "has no checkpoint yet; starting a new run there" in capsys.readouterr().err
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "run.json").write_text("{}")
    with pytest.raises(DaPMMError, match=r"holds a run \(run.json\) but no last_checkpoint"):
        _prepared(tmp_path, resume="auto")


def test_the_exported_eval_config_is_the_runs():
    """An mm export's config.json said 224 px and crop 0.875 for every run (the hook recorded nothing); the hook now
    records the val pipeline's CenterCrop and ResizeEdge, else the train crop's size."""
    from mmengine.config import Config

    from dap_pretrain.mm.hook import eval_data_config

    cfg = Config.fromfile(str(Path(__file__).resolve().parents[2] / "configs/mmpretrain/resnet18_dap75_in1k.py"))
    assert eval_data_config(cfg) == {"img_size": 224, "crop_pct": 224 / 256, "interpolation": "bilinear"}
    cfg.merge_from_dict(
        {"val_dataloader.dataset.pipeline.1.scale": 36, "val_dataloader.dataset.pipeline.2.crop_size": 32}
    )
    assert eval_data_config(cfg) == {"img_size": 32, "crop_pct": 32 / 36, "interpolation": "bilinear"}
    cfg.val_dataloader = None  # --no-validate: the train crop's size
    cfg.merge_from_dict({"train_dataloader.dataset.pipeline.1.scale": 64})
    assert eval_data_config(cfg) == {"img_size": 64}
    cfg.train_dataloader.dataset.pipeline = []
    assert eval_data_config(cfg) == {}


@pytest.mark.parametrize(
    "option, expect",
    [
        (
            "model.backbone.depthh=18",
            "--cfg-options model.backbone.depthh: ResNet takes no argument 'depthh' (did you mean "
            "model.backbone.depth?)",
        ),
        (
            "train_dataloader.dataset.pipeline.1.scalee=32",
            "--cfg-options train_dataloader.dataset.pipeline.1.scalee: RandomResizedCrop takes no argument 'scalee' "
            "(did you mean train_dataloader.dataset.pipeline.1.scale?)",
        ),
        (
            "val_dataloader.dataset.pipeline.1.edgee=short",
            "--cfg-options val_dataloader.dataset.pipeline.1.edgee: ResizeEdge takes no argument 'edgee' (did you "
            "mean val_dataloader.dataset.pipeline.1.edge?)",
        ),
        (
            "optim_wrapper.optimizer.lrr=0.1",
            "--cfg-options optim_wrapper.optimizer.lrr: SGD takes no argument 'lrr' (did you mean "
            "optim_wrapper.optimizer.lr?)",
        ),
        ("param_scheduler.gama=0.2", "--cfg-options param_scheduler.gama: MultiStepLR takes no argument 'gama' (did"),
        (
            "train_dataloader.dataset.pipeline.9.scale=32",
            "--cfg-options train_dataloader.dataset.pipeline.9.scale: train_dataloader.dataset.pipeline has 4 items "
            "(LoadImageFromFile, RandomResizedCrop, RandomFlip, PackInputs), so index 9 is past its end",
        ),
        ("model.backbone.depth.x=1", "--cfg-options model.backbone.depth.x=1 cannot be merged into the config (Type"),
    ],
)
def test_cfg_options_a_build_would_refuse_are_refused_by_the_check(tmp_path, cifar_tiny, option, expect):
    """A misspelled key passed --check ("inputs ok"), then mmengine's TypeError traceback when the Runner built the
    model, a pipeline (the val loader's after the first epoch) or the optimizer; an index past a list's end was
    mmengine's KeyError traceback from the merge. Each is now one line naming the option (hunt of session 20)."""
    from mmengine.config import DictAction

    from dap_pretrain.mm.runner import pretrain_mm
    from dap_pretrain.mm.settings import DaPMMError

    config = Path(__file__).resolve().parents[2] / "configs/mmpretrain/resnet18_dap75_in1k.py"
    key, value = option.split("=", 1)
    options = {key: DictAction._parse_iterable(value)}
    with pytest.raises(DaPMMError) as e:
        pretrain_mm(config=config, data_root=cifar_tiny, work_dir=tmp_path / "w", cfg_options=options, check=True)
    assert str(e.value).startswith(expect) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "w").exists()


def test_the_build_check_takes_an_amp_optimizer_on_a_cpu_machine(tmp_path):
    """`--check` on a CPU login node for a GPU job whose config trains with mmengine's AmpOptimWrapper (it needs a
    GPU to be built): the check builds the same optimizer in a plain wrapper, so it passes there and still names
    a misspelled optimizer key."""
    from dap_pretrain.mm.buildable import build_refusal

    body = "optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')"
    cfg = _prepared(tmp_path, body, cfg_options={"optim_wrapper.optimizer.momentum": 0.8})
    assert cfg.optim_wrapper.type == "AmpOptimWrapper"
    if not torch.cuda.is_available():
        assert build_refusal(cfg, {}) is None
    cfg = _prepared(tmp_path, body, cfg_options={"optim_wrapper.optimizer.momentun": 0.8})
    assert build_refusal(cfg, {"optim_wrapper.optimizer.momentun": 0.8}).startswith(
        "--cfg-options optim_wrapper.optimizer.momentun: SGD takes no argument 'momentun' (did you mean "
        "optim_wrapper.optimizer.momentum?)"
    )


def test_a_work_dir_inside_a_split_folder_is_refused(tmp_path, cifar_tiny):
    """--work-dir inside train/ or val/ passed --check; mmengine then created it before mmpretrain listed the
    class folders, so the work dir became an extra (empty) class (mmpretrain only warns "Found no valid file in the
    folder"), which shifts the label of every class whose name sorts after it."""
    import os

    from dap_pretrain.mm.runner import pretrain_mm
    from dap_pretrain.mm.settings import DaPMMError

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in sorted(p for p in (cifar_tiny / split).iterdir() if p.is_dir())[:2]:
            (data / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:2]:
                os.link(f, data / split / cls.name / f.name)
    config = Path(__file__).resolve().parents[2] / "configs/mmpretrain/resnet18_dap75_in1k.py"
    for work, split in ((data / "train" / "w", "train"), (data / "val" / "x" / "w", "val")):
        with pytest.raises(DaPMMError) as e:
            pretrain_mm(config=config, data_root=data, work_dir=work, check=True)
        assert str(e.value) == (
            f"--work-dir {work} is inside {data / split}, whose folders {split}_dataloader.dataset reads as "
            f"classes: the work dir would be read as one; pass a --work-dir outside {data}"
        )
        assert not work.exists()
    assert pretrain_mm(config=config, data_root=data, work_dir=data / "runs" / "w", check=True) == {}


def test_the_build_check_is_no_stricter_than_the_run(tmp_path):
    """What the check cannot build as the Runner does is left to the run, not refused: a dataset class of the
    user's own without mmengine's ``lazy_init`` (built here it would read its data), and a scheduler that fails
    for a reason of its own (the check builds it without the Runner's conversion to iterations). A misspelled
    option of that scheduler is still named."""
    from mmengine.optim.scheduler import LinearLR
    from mmpretrain.registry import DATASETS, PARAM_SCHEDULERS

    from dap_pretrain.mm.buildable import build_refusal

    class NoLazyInitDataset(torch.utils.data.Dataset):
        def __init__(self, n: int, pipeline=None):
            self.n = n

    class NeedsTheEpochLength(LinearLR):
        def __init__(self, optimizer, *, epoch_length=None, **kwargs):
            super().__init__(optimizer, **kwargs)
            if epoch_length is None:
                raise ValueError("needs the epoch length")

    DATASETS.register_module(name="NoLazyInitDatasetForTest", module=NoLazyInitDataset, force=True)
    PARAM_SCHEDULERS.register_module(name="NeedsTheEpochLengthForTest", module=NeedsTheEpochLength, force=True)
    body = (
        "train_dataloader = dict(dataset=dict(_delete_=True, type='NoLazyInitDatasetForTest', n=3))\n"
        "param_scheduler = dict(_delete_=True, type='NeedsTheEpochLengthForTest', by_epoch=True)"
    )
    assert build_refusal(_prepared(tmp_path, body), {}) is None
    options = {"param_scheduler.by_epok": True}
    assert build_refusal(_prepared(tmp_path, body, cfg_options=options), options).startswith(
        "--cfg-options param_scheduler.by_epok: NeedsTheEpochLengthForTest takes no argument 'by_epok' (did you mean "
        "param_scheduler.by_epoch?)"
    )
