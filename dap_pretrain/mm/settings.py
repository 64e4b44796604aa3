"""The mm config's ``dap = dict(...)`` block, resolved into the engine's :class:`~dap_pretrain.schedule.DaPConfig`.

Pure functions on plain values (no mmengine import), shared by the entry point, which validates the block before
anything is built, and by :class:`~dap_pretrain.mm.hook.DaPHook`, which resolves it against the built runner.
"""

from __future__ import annotations

from dataclasses import dataclass

from dap_pretrain.data.sampler import SELECT_STRATEGIES
from dap_pretrain.errors import UsageError
from dap_pretrain.schedule import DaPConfig

DAP_KEYS = ("warmup", "interval", "keep", "active", "reuse", "select", "seed")


class DaPMMError(UsageError):
    """Bad input to the mmengine front end (config, data root, work dir, resume); one line naming the fix.

    ``python -m dap_pretrain.mm.train`` catches it once, prints it on stderr and exits with code 2.
    """


@dataclass(frozen=True)
class DaPSettings:
    """A resolved ``dap`` block.

    Attributes:
        config: the schedule (epochs from ``train_cfg.max_epochs``, reuse defaulted to the LR milestones).
        select: ``hard`` (DaP), ``random`` (DaP's sizes, uniform choice) or ``none`` (all data every epoch).
        seed: shuffle/selection seed; ``None`` uses the runner's seed (``randomness.seed``, the same on every rank).
    """

    config: DaPConfig
    select: str = "hard"
    seed: int | None = None

    def to_dict(self, *, seed: int | None = None) -> dict:
        """The ``dap`` entry of ``run.json``, in the timm trainer's layout; ``seed``: the sampler's (``self.seed``, or
        the runner's where that is None)."""
        return {
            **self.config.to_dict(),
            "select": self.select,
            "epochs_scale": None,
            "fixed_subset": None,
            "seed": self.seed if seed is None else seed,
        }


def resolve_dap(dap: dict | None, *, epochs: int, milestones: tuple[int, ...] = ()) -> DaPSettings:
    """Turn a config's ``dap`` block into :class:`DaPSettings`.

    Args:
        dap: the block; keys from :data:`DAP_KEYS`, any may be left out (``DaPConfig``'s defaults apply).
        epochs: ``train_cfg.max_epochs``.
        milestones: epochs at whose end the LR decays (the epoch-based MultiStepLR's), the paper's R when
            ``reuse`` is ``None``; those outside 1..epochs are ignored, as in the timm trainer.

    Raises:
        DaPMMError: a missing block, an unknown key, or a value ``DaPConfig`` refuses (named as ``dap.KEY``).
    """
    if dap is None:
        raise DaPMMError(
            "the config has no `dap = dict(...)` block; inherit configs/mmpretrain/_base_/dap_in1k.py or add one"
        )
    unknown = sorted(set(dap) - set(DAP_KEYS))
    if unknown:
        raise DaPMMError(f"unknown dap keys {unknown}; the dap block takes {', '.join(DAP_KEYS)}")
    select = dap.get("select", "hard")
    if select not in SELECT_STRATEGIES:
        raise DaPMMError(f"dap.select={select!r} is invalid: must be one of {', '.join(SELECT_STRATEGIES)}")
    seed = dap.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise DaPMMError(f"dap.seed={seed!r} is invalid: must be an integer or None (the runner's seed)")
    reuse = dap.get("reuse")
    if reuse is None:
        reuse = tuple(m for m in sorted(set(milestones)) if 1 <= m <= epochs)
    kwargs = {k: dap[k] for k in ("warmup", "interval", "keep", "active") if k in dap}
    try:
        config = DaPConfig(epochs=epochs, reuse=tuple(reuse), **kwargs)
    except (ValueError, TypeError) as e:  # DaPConfig's one-line messages name the trainer's flag: --dap-KEY
        named = str(e).replace("--dap-", "dap.").replace("--epochs=", "train_cfg.max_epochs=")
        raise DaPMMError(named) from None
    return DaPSettings(config=config, select=select, seed=seed)


def _cfg_key(key: str) -> str:
    return "train_cfg.max_epochs" if key == "epochs" else f"dap.{key}"


def resume_mismatch(sampler_state: dict, settings: DaPSettings) -> str | None:
    """Why a checkpoint's DaP sampler state cannot continue under ``settings`` (one line naming the fix), or ``None``.

    Args:
        sampler_state: ``checkpoint['dap']['sampler']`` (``DaPSampler.state_dict()``).
        settings: this run's resolved ``dap`` block; its ``epochs`` is ``train_cfg.max_epochs``, so a changed
            ``max_epochs`` is named as that key, not as the dap block. A ``dap.seed`` set to another value than the
            checkpoint's sampler seed is a mismatch too (its subsets and order were drawn with that seed).
    """
    saved = dict(sampler_state.get("config") or {}, select=sampler_state.get("select"), seed=sampler_state.get("seed"))
    ours = dict(settings.config.to_dict(), select=settings.select)
    if settings.seed is not None:  # else the checkpoint's seed goes on, as mmengine's resume keeps randomness.seed
        ours["seed"] = settings.seed
    keys = [k for k in ours if saved.get(k) != ours[k]]
    if not keys:
        return None
    was = ", ".join(f"{_cfg_key(k)}={saved.get(k)!r}" for k in keys)
    now = ", ".join(f"{_cfg_key(k)}={ours[k]!r}" for k in keys)
    extend = " (a DaP schedule is planned for its epochs, so a run cannot be extended)" if "epochs" in keys else ""
    return (
        f"--resume: the checkpoint's run has {was}, this run has {now}; resume with the checkpoint's values{extend}, "
        "or start a new run in another --work-dir"
    )
