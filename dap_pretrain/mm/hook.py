"""``DaPHook``: drives the DaP sampler from mmengine's epoch loop, and keeps the run's books.

Who calls what, and when (mmengine calls the hook; the hook calls the engine):

* ``after_load_checkpoint`` (``--resume`` or ``load_from``, before training starts): keeps ``checkpoint['dap']``.
* ``before_train`` (all ranks; loops, optimizer and schedulers are built, weights loaded): resolves the config's
  ``dap`` block (epochs from ``train_cfg.max_epochs``, reuse defaulted to the MultiStepLR milestones), refuses
  what would make DaP wrong (iteration-counting loops or LR schedulers, a wrapped dataset, a head that cannot
  record losses), configures the :class:`~dap_pretrain.mm.sampler.DaPMMSampler`, restores the kept state when the
  runner resumed (``runner.epoch > 0``: sampler, accounting, history, every rank's RNGs, so the run continues
  exactly) and attaches the sampler to the :class:`~dap_pretrain.mm.head.DaPClsHead` (detached in ``after_train``),
  with the data preprocessor's ``batch_augments`` (Mixup/CutMix) traced so that mixed losses split by sample.
  Validation- or test-only runs (``runner.val()``/``test()``) never call it, and the hook then does nothing.
* ``before_train_epoch``: ``sampler.set_epoch(runner.epoch)``; ``after_train_epoch`` (priority NORMAL, so before
  the checkpoint and LR hooks): ``sampler.end_epoch()`` on every rank, accounting, ``summary.csv``, the log line.
* ``before_save_checkpoint`` (rank 0): ``checkpoint['dap'] = state`` (see :meth:`DaPHook.state`).
* ``after_val_epoch``: top-1/5 into the epoch's row. ``after_val`` (every hook's ``after_val_epoch`` has run, so
  mmpretrain's ``EMAHook(evaluate_on_origin=True)`` has validated the raw weights too): their top-1/5 into the row
  as ``eval_top1_origin``/``eval_top5_origin`` (mmpretrain's ``val/accuracy/top1_origin``), ``summary.csv``, and,
  since mmengine saves before it validates, the checkpoint files saved at this epoch brought up to date: its own
  and a ``save_best`` one (rank 0, local files).
* ``after_train``: ``WORK_DIR/run.json`` with the timm trainer's keys.

Exact resume with loader workers also needs a fixed ``randomness.seed``: with ``seed=None`` mmengine seeds the
workers from a fresh draw in the resumed process, so augmentation (and with it the hard subsets) may differ after
the resume. Checked here with ``num_workers=0`` and ``seed=0``: resumed == uninterrupted, weights bit for bit.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from mmengine.dataset import BaseDataset
from mmengine.dist import get_dist_info, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim.scheduler import MultiStepParamScheduler
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop

from dap_pretrain.checkpoint import rng_state, set_rng_state
from dap_pretrain.data.dataset import files_digest
from dap_pretrain.data.sampler import NonFiniteLossError
from dap_pretrain.errors import refused_on_every_rank
from dap_pretrain.mm.head import RANKED_SELECT, DaPLossMixin, TracedBatchAugments, head_refusal
from dap_pretrain.mm.sampler import DaPMMSampler
from dap_pretrain.mm.settings import DaPMMError, DaPSettings, resolve_dap, resume_mismatch
from dap_pretrain.reporting import Accounting, subset_digest
from dap_pretrain.schedule import plan

STATE_VERSION = 2  # 2: run's top1/top5 are the raw weights', ema_top1/ema_top5 the EMA's, each None if not validated
_INF_STEPS = 10**8  # mmengine's schedulers end at int(1e9) "steps" when no end is given


def _flat(schedulers) -> list:
    if schedulers is None:
        return []
    if isinstance(schedulers, dict):  # one list per optimizer
        return [s for group in schedulers.values() for s in _flat(group)]
    return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]


def lr_milestones(schedulers) -> tuple[int, ...]:
    """Epochs at whose end an epoch-based MultiStepLR decays the LR (the paper's reuse epochs R; a StepLR without an
    explicit ``dap.reuse`` is refused before the run is built, :func:`~dap_pretrain.mm.runner.check_config`)."""
    out = set()
    for s in _flat(schedulers):
        if isinstance(s, MultiStepParamScheduler) and s.param_name == "lr" and s.by_epoch:
            out.update(s.begin + int(m) for m in s.milestones)
    return tuple(sorted(out))


def check_schedulers(schedulers, *, warmup: int, epoch_len: int) -> None:
    """Refuse a scheduler that counts iterations past the DaP warm-up (where DaP starts to shorten epochs).

    ``convert_to_iter_based=True`` fixes the epoch length at build time and ``by_epoch=False`` counts iterations, so
    after the first drop their LR at a given epoch would no longer be the full-data run's. One that ends within the
    warm-up (e.g. a linear LR warm-up) is exact: every warm-up epoch trains on all data.
    """
    limit = warmup * epoch_len
    for s in _flat(schedulers):
        if getattr(s, "by_epoch", True) or s.end <= limit:
            continue
        end = "no end" if s.end >= _INF_STEPS else f"ends at iteration {s.end}"
        raise DaPMMError(
            f"param_scheduler {type(s).__name__} counts iterations (by_epoch=False or convert_to_iter_based=True; "
            f"{end}) but DaP shortens epochs after its warm-up (dap.warmup={warmup} epochs = {limit} iterations), "
            "so its LR would drift from the full-data run's; use by_epoch=True without convert_to_iter_based"
        )


def unwrap(model):
    return model.module if is_model_wrapper(model) else model


def timm_architecture(model) -> str | None:
    """The timm model whose state dict is ``model``'s backbone + ``head.fc`` (keys and shapes), else ``None``.

    mmpretrain's ``ResNet`` (pytorch style, no deep stem or avg-down) + global average pooling + a linear head is
    torchvision's ResNet, which is timm's ``resnet{depth}``; the key/shape match is checked on the meta device.
    """
    import timm

    backbone, neck, head = (getattr(model, k, None) for k in ("backbone", "neck", "head"))
    if type(backbone).__name__ != "ResNet" or type(neck).__name__ != "GlobalAveragePooling" or not hasattr(head, "fc"):
        return None
    if backbone.style != "pytorch" or backbone.deep_stem or backbone.avg_down:
        return None
    name = f"resnet{backbone.depth}"
    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=head.fc.out_features)
    ours = {}
    for key, value in model.state_dict().items():
        if key.startswith(("backbone.", "head.fc.")):
            ours[key.removeprefix("backbone.").removeprefix("head.")] = tuple(value.shape)
    return name if ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()} else None


def _gather_rng(digest: str) -> list:
    """Every rank's RNG state (for the checkpoint), checking on the way that all ranks hold the same subset."""
    state = rng_state()
    _, world = get_dist_info()
    if world == 1:
        return [state]
    out = [None] * world
    dist.all_gather_object(out, (state, digest))
    if len({d for _, d in out}) > 1:
        raise RuntimeError(f"DDP ranks disagree on the DaP subset ({sorted({d for _, d in out})}); please report it")
    return [s for s, _ in out]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _logged(runner, name: str) -> int:
    """How many values the message hub holds for scalar ``name`` (0 if none)."""
    buffer = runner.message_hub.log_scalars.get(name)
    return 0 if buffer is None else len(buffer.data[0])


def _recorded_wall(work_dir: Path, state: dict) -> float | None:
    """A finished run's wall time: its run.json's, else what its last checkpoint recorded."""
    try:
        return float(json.loads((work_dir / "run.json").read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return (state.get("run") or {}).get("wall_time_s")


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))  # rows[0]'s order; a resumed run may add some
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def eval_data_config(cfg) -> dict:
    """The run's evaluation preprocessing as timm's pretrained cfg names it, for the export's ``config.json``:
    ``img_size`` (the val pipeline's ``CenterCrop``), ``crop_pct`` (that over ``ResizeEdge``'s short side) and
    ``interpolation`` (``ResizeEdge``'s; mmpretrain's default is bilinear). Without a validation pipeline of that
    shape, ``img_size`` from the train pipeline's ``RandomResizedCrop``; ``{}`` where neither says (the export then
    takes mmpretrain's ImageNet values)."""

    def steps(name: str) -> list:
        return (((cfg.get(name) or {}).get("dataset") or {}).get("pipeline")) or []

    resize = next((t for t in steps("val_dataloader") if t.get("type") == "ResizeEdge"), None)
    crop = next((t for t in steps("val_dataloader") if t.get("type") == "CenterCrop"), None)
    if resize and crop and resize.get("edge", "short") == "short":
        size, short = crop.get("crop_size"), resize.get("scale")
        if isinstance(size, int) and isinstance(short, int) and short >= size > 0:
            return {
                "img_size": size,
                "crop_pct": size / short,
                "interpolation": resize.get("interpolation", "bilinear"),
            }
    train = next((t for t in steps("train_dataloader") if t.get("type") == "RandomResizedCrop"), None)
    return {"img_size": train["scale"]} if train and isinstance(train.get("scale"), int) else {}


def ema_validates(hooks) -> bool:
    """Whether validation sees EMA weights: an ``EMAHook`` swaps them in, mmengine's always and mmpretrain's unless
    ``evaluate_on_ema=False`` (then it validates the raw weights)."""
    from mmengine.hooks import EMAHook

    return any(isinstance(h, EMAHook) and getattr(h, "evaluate_on_ema", True) for h in hooks)


def origin_validates(hooks) -> bool:
    """Whether an ``EMAHook`` that validates the EMA weights also validates the raw ones after them (mmpretrain's
    ``evaluate_on_origin=True``), logging their metrics as ``val/<metric>_origin``."""
    from mmengine.hooks import EMAHook

    return any(
        isinstance(h, EMAHook) and getattr(h, "evaluate_on_ema", True) and getattr(h, "evaluate_on_origin", False)
        for h in hooks
    )


ORIGIN_KEYS = (("eval_top1_origin", "val/accuracy/top1_origin"), ("eval_top5_origin", "val/accuracy/top5_origin"))


def _percent(value: float | None) -> str:
    """A top-1 for the log: two decimals (mmpretrain's float32 accuracy prints as 41.666664...), or why none."""
    return "not measured" if value is None else f"{value:.2f}%"


@HOOKS.register_module()
class DaPHook(Hook):
    """Drop-and-Pick for an mmengine epoch-based run (see the module docstring for the call contract).

    Takes no arguments: the DaP parameters are the config's top-level ``dap = dict(...)`` block (``runner.cfg.dap``),
    so ``--cfg-options dap.keep=...`` reaches them.
    """

    priority = "NORMAL"  # after_train_epoch must run before CheckpointHook (VERY_LOW) and ParamSchedulerHook (LOW)

    def __init__(self):
        self.settings: DaPSettings | None = None
        self.sampler: DaPMMSampler | None = None
        self.acct: Accounting | None = None
        self.summary: dict | None = None  # run.json's content once training has ended
        self.timm_model: str | None = None
        self.num_classes: int | None = None
        self._model_name = self._dataset = ""
        self._ema_validates = False  # an EMAHook swaps the EMA weights in for every validation
        self._origin_validates = False  # ... and validates the raw weights after them (mmpretrain's)
        self._origin_seen: dict[str, int] = {}  # how often each ORIGIN_KEYS scalar was logged before this validation
        self._loaded: dict | None = None
        self._loaded_classes = None  # the resumed checkpoint's dataset classes (mmengine's meta.dataset_meta)
        self._train_dataset = None
        self._files: tuple[str | None] | None = None  # (files_digest of the train dataset,) once computed
        self._eval_cfg: dict = {}  # eval_data_config(runner.cfg)
        self._wall_done: float | None = None  # a finished run resumed: the wall time it recorded
        self._rngs: list = []
        self._t_start = self._t_epoch = self._t_val = 0.0
        self._iter0 = 0
        self._digest = ""
        self._lr = None

    # -- setup ------------------------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = checkpoint.get("dap")
        self._loaded_classes = ((checkpoint.get("meta") or {}).get("dataset_meta") or {}).get("classes")

    def before_train(self, runner) -> None:
        """Check the built run and restore a resumed one. Its refusals come from the config and the checkpoint,
        which every rank reads alike: under torchrun each is printed once per node."""
        with refused_on_every_rank():
            self._check_and_restore(runner)

    def _check_and_restore(self, runner) -> None:
        self._setup(runner)
        state, self._loaded = self._loaded, None
        if runner.epoch > 0:
            if state is None:
                raise DaPMMError(
                    f"the resumed checkpoint (epoch {runner.epoch}) has no DaP state (checkpoint['dap']); resume "
                    "from a checkpoint this DaP run wrote, or start a new run"
                )
            saved, now = self._loaded_classes, runner.train_dataloader.dataset.metainfo.get("classes")
            if saved is not None and now is not None and tuple(saved) != tuple(now):  # mmengine only warns
                shown = ", ".join(list(saved)[:3]) + (" ..." if len(saved) > 3 else "")
                raise DaPMMError(
                    f"the resumed checkpoint trained on other classes ({shown}) than this run's data root has; "
                    "its DaP subset and losses belong to those images: resume with the same dataset (--data-root), "
                    "or start a new run"
                )
            saved_files = (state.get("run") or {}).get("files_digest")
            if saved_files and self.files_digest() and saved_files != self.files_digest():
                raise DaPMMError(
                    f"the resumed checkpoint trained on other images than this run's data root has (both "
                    f"{self.sampler.num_samples} samples of the same classes, but other file names or labels); its DaP "
                    "subset and losses belong to those images: resume with the same dataset (--data-root), or start "
                    "a new run"
                )
            self._restore(runner, state)
            if runner.epoch >= self.settings.config.epochs:
                runner.logger.info(
                    f"DaP: the resumed run is finished ({runner.epoch} of {self.settings.config.epochs} epochs); "
                    "nothing left to train, its results are written again"
                )
                self._wall_done = _recorded_wall(Path(runner.work_dir), state)  # its own, not this start's
        elif state is not None:
            runner.logger.info("the load_from checkpoint's DaP state is ignored: a new run starts DaP afresh")
        model = unwrap(runner.model)
        preprocessor = getattr(model, "data_preprocessor", None)
        augments = getattr(preprocessor, "batch_augments", None)
        if augments is not None and not isinstance(augments, TracedBatchAugments):
            preprocessor.batch_augments = augments = TracedBatchAugments(augments)
            runner.logger.info(
                "batch augments %s: each sample's loss for DaP is its own label's loss in the images that carry it",
                ", ".join(type(a).__name__ for a in getattr(augments.inner, "augments", [augments.inner]) if a),
            )
        model.head.attach(self.sampler, ranked=self.settings.select in RANKED_SELECT, mixing=augments)
        self._t_start = time.perf_counter() - sum(r["epoch_time_s"] for r in self.acct.history)

    def _setup(self, runner) -> None:
        self._eval_cfg = eval_data_config(runner.cfg)
        loop = runner.train_loop
        if not isinstance(loop, EpochBasedTrainLoop):
            raise DaPMMError(
                f"DaP needs an epoch-based train loop, this config builds {type(loop).__name__}; "
                "set train_cfg=dict(by_epoch=True, max_epochs=N)"
            )
        sampler, dataset = loop.dataloader.sampler, loop.dataloader.dataset
        if not isinstance(sampler, DaPMMSampler):
            raise DaPMMError(
                f"train_dataloader.sampler is {type(sampler).__name__}; set train_dataloader.sampler="
                "dict(type='DaPMMSampler') (configs/mmpretrain/*.py do)"
            )
        if not isinstance(dataset, BaseDataset):  # wrappers renumber samples: sample_idx != the sampler's index
            raise DaPMMError(
                f"the train dataset is a {type(dataset).__name__}; DaP needs a plain dataset whose sample_idx is "
                "the sampler's index (no RepeatDataset/ConcatDataset/ClassBalancedDataset wrapper)"
            )
        model = unwrap(runner.model)
        if not isinstance(getattr(model, "head", None), DaPLossMixin):
            raise DaPMMError(head_refusal(type(getattr(model, "head", None))) or "model.head cannot record losses")
        milestones = lr_milestones(runner.param_schedulers)
        self.settings = resolve_dap(runner.cfg.get("dap"), epochs=loop.max_epochs, milestones=milestones)
        config = self.settings.config
        if self.settings.select != "none":
            check_schedulers(runner.param_schedulers, warmup=config.warmup, epoch_len=len(loop.dataloader))
        sampler.configure(config=config, select=self.settings.select, seed=self.settings.seed)
        n = sampler.num_samples
        planned = config.epochs * n if self.settings.select == "none" else plan(config, n).samples_trained
        self.sampler = sampler
        self.acct = Accounting(num_samples=n, baseline_epochs=config.epochs, planned=planned)
        self.timm_model = timm_architecture(model)
        self.num_classes = getattr(model.head, "num_classes", None)
        self._model_name = self.timm_model or f"mmpretrain:{type(model.backbone).__name__}"
        if self.timm_model is None:
            runner.logger.warning(
                f"DaP: {self._model_name} has no timm equivalent, so this run trains but its checkpoints cannot be "
                "exported (python -m dap_pretrain export) nor transferred to COCO: those take mmpretrain's "
                "pytorch-style ResNet with GlobalAveragePooling and a linear head (timm's resnet18/34/50/101/152)"
            )
        self._ema_validates = ema_validates(runner.hooks)
        self._origin_validates = origin_validates(runner.hooks)
        self._dataset = str(getattr(dataset, "data_root", "") or dataset.data_prefix.get("img_path", ""))
        self._train_dataset, self._files = dataset, None
        runner.logger.info(
            f"DaP: {n} training samples, {self.settings.to_dict()}; planned compute "
            f"{planned / self.acct.baseline:.2%} of {config.epochs} full-data epochs"
        )

    def _restore(self, runner, state: dict) -> None:
        if int(state["epoch"]) != runner.epoch:
            raise DaPMMError(
                f"the checkpoint's DaP state is for epoch {state['epoch']} but its weights for epoch {runner.epoch}; "
                "resume from a checkpoint this DaP run wrote"
            )
        mismatch = resume_mismatch(state["sampler"], self.settings)  # also checked before the runner is built
        if mismatch:
            raise DaPMMError(mismatch)
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:  # another dataset
            raise DaPMMError(str(e)) from None
        self.acct.measured = int(state["accounting"]["measured"])
        self.acct.lost = int(state["accounting"]["lost"])
        self.acct.history = [dict(r) for r in state["history"]]
        rank, world = get_dist_info()
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        elif runner.epoch < self.settings.config.epochs:  # a finished run only writes its results again
            runner.logger.warning(
                f"checkpoint has RNG states for {len(state['rng'])} processes, this run has {world}: "
                "augmentation will differ from an uninterrupted run"
            )
        runner.logger.info(f"DaP resumed after epoch {runner.epoch}: next subset {self.sampler.subset.numel()}")

    # -- each epoch -------------------------------------------------------------------------------
    def before_train_epoch(self, runner) -> None:
        self.sampler.set_epoch(runner.epoch)
        self._digest = subset_digest(self.sampler.subset)
        self._iter0 = runner.iter
        lrs = runner.optim_wrapper.get_lr()
        self._lr = next((v[0] for k, v in lrs.items() if not k.endswith("base_lr")), None)
        self._t_epoch = time.perf_counter()

    def after_train_epoch(self, runner) -> None:
        try:
            report = self.sampler.end_epoch()
        except NonFiniteLossError as e:
            raise DaPMMError(
                f"loss of sample index {e.index} is {e.value} in epoch {e.epoch}; lower the LR "
                "(--cfg-options optim_wrapper.optimizer.lr=...) or add gradient clipping (optim_wrapper.clip_grad)"
            ) from None
        seconds = time.perf_counter() - self._t_epoch
        acct = self.acct
        acct.measured += report.seen
        acct.lost += report.size_before - report.seen
        loss = runner.message_hub.get_scalar("train/loss").mean(max(1, runner.iter - self._iter0))
        row = acct.epoch_row(
            epoch=runner.epoch + 1,
            report=report,
            train_loss=float(loss),
            ev={},
            lr=self._lr,
            seconds=seconds,
            img_per_s=report.seen / max(seconds, 1e-9),
            digest=self._digest,
        )
        if self._origin_validates:
            row.update(dict.fromkeys(key for key, _ in ORIGIN_KEYS))
        acct.history.append(row)
        self._rngs = _gather_rng(subset_digest(self.sampler.subset))
        runner.message_hub.update_scalar("dap/subset_size", report.size_before)
        runner.message_hub.update_scalar("dap/compute_fraction", row["cum_compute"])
        runner.visualizer.add_scalars(
            {"dap/subset_size": report.size_before, "dap/compute_fraction": row["cum_compute"]}, step=row["epoch"]
        )
        untrained = f" ({row['untrained']} untrained: drop_last)" if row["untrained"] else ""
        runner.logger.info(
            f"DaP epoch {row['epoch']}/{self.settings.config.epochs}: subset {report.size_before}, trained "
            f"{report.seen}{untrained}, {report.event} -> next {report.size_after}; compute so far "
            f"{row['cum_compute']:.2%} (planned for the run {acct.planned / acct.baseline:.2%})"
        )
        self._write_summary(runner)

    def before_val_epoch(self, runner) -> None:
        self._t_val = time.perf_counter()
        self._origin_seen = {name: _logged(runner, name) for _, name in ORIGIN_KEYS}

    def _in_training(self, runner) -> bool:
        return self.acct is not None and bool(self.acct.history) and self.acct.history[-1]["epoch"] == runner.epoch

    def after_val_epoch(self, runner, metrics: dict | None = None) -> None:
        if not self._in_training(runner):
            return  # a validation outside training
        row = self.acct.history[-1]
        metrics = metrics or {}
        for key, name in (("eval_top1", "accuracy/top1"), ("eval_top5", "accuracy/top5")):
            row[key] = float(metrics[name]) if name in metrics else None
        self._read_origin(runner, row)  # here if the EMAHook's after_val_epoch ran before this one
        now = time.perf_counter()  # in the row before CheckpointHook (VERY_LOW) saves a best checkpoint
        row["epoch_time_s"] = round(row["epoch_time_s"] + now - self._t_val, 3)
        self._t_val = now

    def after_val(self, runner) -> None:
        if not self._in_training(runner):
            return
        row = self.acct.history[-1]
        self._read_origin(runner, row)  # every after_val_epoch has run: the raw weights' validation too
        row["epoch_time_s"] = round(row["epoch_time_s"] + time.perf_counter() - self._t_val, 3)
        self._write_summary(runner)
        if is_main_process():
            self._update_saved_checkpoints(runner)

    def _read_origin(self, runner, row: dict) -> None:
        """The raw weights' top-1/5 that mmpretrain's ``EMAHook(evaluate_on_origin=True)`` logs in its
        ``after_val_epoch``, if it has logged them during this validation (else None)."""
        if not self._origin_validates:
            return
        hub = runner.message_hub
        for key, name in ORIGIN_KEYS:
            fresh = _logged(runner, name) > self._origin_seen.get(name, 0)
            row[key] = float(hub.get_scalar(name).current()) if fresh else None

    def after_train(self, runner) -> None:
        model = unwrap(runner.model)
        model.head.detach()
        preprocessor = getattr(model, "data_preprocessor", None)
        if isinstance(getattr(preprocessor, "batch_augments", None), TracedBatchAugments):
            preprocessor.batch_augments = preprocessor.batch_augments.inner
        self.summary = self.run_summary()
        if is_main_process():
            _write_atomic(Path(runner.work_dir) / "run.json", json.dumps(self.summary, indent=2) + "\n")
        s = self.summary
        top1 = f"top-1 (EMA) {_percent(s['ema_top1'])}" if self._ema_validates else f"top-1 {_percent(s['top1'])}"
        if self._origin_validates:
            top1 += f", raw weights {_percent(s['top1'])}"
        runner.logger.info(
            f"compute spent: {s['compute_fraction_measured']:.2%} of full-data training ({s['samples_trained']:,} / "
            f"{s['samples_baseline']:,} samples; planned {s['compute_fraction_planned']:.2%}); {top1}; "
            f"wall {s['wall_time_s']:.1f}s -> {Path(runner.work_dir) / 'run.json'}"
        )

    # -- state and books --------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.acct is not None:  # a checkpoint saved outside training carries no DaP state
            checkpoint["dap"] = self.state()

    def state(self) -> dict:
        """``checkpoint['dap']``: plain tensors, numbers, strings, lists and dicts.

        Keys: ``version``; ``epoch`` (epochs completed); ``sampler`` (``DaPSampler.state_dict()``); ``accounting``
        (``planned``/``measured``/``lost`` samples); ``history`` (the ``summary.csv`` rows); ``rng`` (every rank's
        RNG state); ``run``: :meth:`run_summary` so far plus ``timm_model`` (the timm architecture of
        ``backbone.*`` + ``head.fc.*``, or ``None``) and ``num_classes``.
        """
        acct = self.acct
        return {
            "version": STATE_VERSION,
            "epoch": acct.history[-1]["epoch"] if acct.history else 0,
            "sampler": self.sampler.state_dict(),
            "accounting": {"planned": acct.planned, "measured": acct.measured, "lost": acct.lost},
            "history": [dict(r) for r in acct.history],
            "rng": self._rngs,
            "run": {
                **self.run_summary(),
                "timm_model": self.timm_model,
                "num_classes": self.num_classes,
                "files_digest": self.files_digest(),
                **self._eval_cfg,  # the export's timm config: the size and crop this run evaluated at
            },
        }

    def files_digest(self) -> str | None:
        """:func:`~dap_pretrain.data.dataset.files_digest` of the train dataset's ``(img_path, gt_label)`` pairs,
        paths relative to its data root (a resume on other images of the same classes and count is refused); None
        where its samples have no ``img_path``. Computed once per run, when a checkpoint or a resume first needs it
        (mmengine's serialized data list: about 4 s per million samples on 2 CPU cores)."""
        if self._files is None and self._train_dataset is not None:
            data = self._train_dataset  # one loader filled its data list: all samples have img_path, or none
            named = len(data) > 0 and bool(data.get_data_info(0).get("img_path"))
            infos = (data.get_data_info(i) for i in range(len(data)))  # streamed: no list of a million dicts
            pairs = ((info["img_path"], info.get("gt_label", -1)) for info in infos)
            self._files = (files_digest(pairs, root=self._dataset) if named else None,)
        return self._files[0] if self._files else None

    def run_summary(self) -> dict:
        """What ``run.json`` holds: the timm trainer's keys; top-1/5 from the last validated epoch (percent), as
        ``top1``/``top5``, or as ``ema_top1``/``ema_top5`` when an ``EMAHook`` validated the EMA weights. Then
        ``top1``/``top5`` are the raw weights' figures if the hook validated them too (mmpretrain's
        ``evaluate_on_origin=True``), else None (never measured), as the timm trainer's keys mean."""
        evaluated = [r for r in self.acct.history if r["eval_top1"] is not None]
        last = evaluated[-1] if evaluated else {}
        top = (last.get("eval_top1"), last.get("eval_top5"))
        origin = (last.get("eval_top1_origin"), last.get("eval_top5_origin"))
        (top1, top5), (ema_top1, ema_top5) = (origin, top) if self._ema_validates else (top, (None, None))
        return self.acct.run_summary(
            model=self._model_name,
            epochs=self.settings.config.epochs,
            dataset=self._dataset,
            top1=top1,
            top5=top5,
            ema_top1=ema_top1,
            ema_top5=ema_top5,
            wall_s=self._wall_done if self._wall_done is not None else time.perf_counter() - self._t_start,
            dap=self.settings.to_dict(seed=getattr(self.sampler, "seed", None)),
            processes=get_dist_info()[1],
        )

    def _write_summary(self, runner) -> None:
        if is_main_process():
            _write_atomic(Path(runner.work_dir) / "summary.csv", _csv_text(self.acct.history))

    def _update_saved_checkpoints(self, runner) -> None:
        """Put the just-validated epoch's figures into the checkpoints saved at that epoch: the epoch's own
        (mmengine saved it before validating) and a best one (``save_best``, saved before the raw weights' figures
        of ``evaluate_on_origin`` were read)."""
        hub = runner.message_hub
        keys = ["last_ckpt"] + [k for k in hub.runtime_info if k.startswith("best_ckpt")]
        for path in dict.fromkeys(hub.get_info(k) for k in keys):
            if not path or not os.path.isfile(path):  # no checkpoint yet, or a remote file backend
                continue
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # this run's own file, in its work dir
            if "dap" not in ckpt or ckpt.get("meta", {}).get("epoch") != self.acct.history[-1]["epoch"]:
                continue  # saved at another epoch (CheckpointHook interval > 1, an earlier best)
            ckpt["dap"] = self.state()
            tmp = f"{path}.dap.tmp"
            try:
                torch.save(ckpt, tmp)
                os.replace(tmp, path)
            finally:  # Ctrl-C or a full disk mid-write: no partial copy left beside the checkpoint
                if os.path.exists(tmp):
                    os.unlink(tmp)
