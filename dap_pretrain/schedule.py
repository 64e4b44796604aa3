"""The Drop-and-Pick schedule (paper Algorithm 1) as a small state machine, plus the planner.

Epochs are 1-based here, as in the paper: epoch ``tau`` trains on the subset chosen at the end of
epoch ``tau - 1``. :class:`DaPSchedule` is asked once at the END of each epoch what to do with the
subset for the next one: keep it, drop to the hardest fraction ``keep`` of it, or reuse all data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

IMAGENET_NUM_SAMPLES = 1_281_167  # ImageNet-1k train split

KEEP = "keep"
DROP = "drop"
REUSE = "reuse"
WARMUP = "warm-up"


def _check(ok: bool, name: str, allowed: str, value) -> None:
    """``name`` is the setting's command-line flag without its dashes (``dap-keep``): the error names the flag."""
    if not ok:
        raise ValueError(f"--{name}={value!r} is invalid: must be {allowed}")


@dataclass(frozen=True)
class DaPConfig:
    """The paper's Table 1 parameters.

    Attributes:
        epochs: total epochs E.
        warmup: warm-up epochs W trained on all data, 0 <= W < E.
        interval: drop every I epochs (I >= 1), counted from the last drop or cycle start.
        keep: fraction p of the *current* subset kept at each drop, 0 < p <= 1.
        active: drops only while fewer than alpha epochs have passed since the cycle started
            (None = unlimited).
        reuse: epochs R (sorted, unique, in 1..E) at whose end all data is picked back up and a
            new cycle starts; the paper uses the LR-decay epochs.
    """

    epochs: int
    warmup: int = 0
    interval: int = 1
    keep: float = 1.0
    active: int | None = None
    reuse: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "reuse", tuple(int(r) for r in (self.reuse or ())))
        e = self.epochs
        _check(isinstance(e, int) and e >= 1, "epochs", "an integer >= 1", e)
        _check(
            isinstance(self.warmup, int) and 0 <= self.warmup < e,
            "dap-warmup",
            f"an integer in [0, {e - 1}] (W < epochs)",
            self.warmup,
        )
        _check(isinstance(self.interval, int) and self.interval >= 1, "dap-interval", "an integer >= 1", self.interval)
        _check(isinstance(self.keep, (int, float)) and 0.0 < self.keep <= 1.0, "dap-keep", "in (0, 1]", self.keep)
        _check(
            self.active is None or (isinstance(self.active, int) and self.active >= 1),
            "dap-active",
            "an integer >= 1 (or omitted for unlimited)",
            self.active,
        )
        r = list(self.reuse)
        _check(r == sorted(set(r)), "dap-reuse", "sorted ascending without duplicates", r)
        _check(all(1 <= x <= e for x in r), "dap-reuse", f"epochs in 1..{e}", r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reuse"] = list(self.reuse)
        return d


class DaPSchedule:
    """Algorithm 1's control flow: decides, at the end of each epoch, what the next subset is.

    Call :meth:`step` exactly once at the END of every epoch ``tau`` (1-based), after that epoch's
    losses are recorded. It returns ``DROP`` (keep the hardest ``keep`` fraction of the current
    subset), ``REUSE`` (all data, new cycle), ``WARMUP`` (a warm-up epoch: all data, nothing ranked yet)
    or ``KEEP`` (unchanged). State is two ints, so a
    schedule restored from :meth:`state_dict` continues exactly.
    """

    def __init__(self, config: DaPConfig):
        self.config = config
        self.t_start = config.warmup  # epoch the current cycle started (paper: T_start)
        self.t_previous = config.warmup  # epoch of the last drop or cycle start (paper: T_previous)
        self.last_epoch = 0

    def step(self, epoch: int) -> str:
        c = self.config
        if epoch != self.last_epoch + 1:
            raise RuntimeError(f"DaPSchedule.step() got epoch {epoch}, expected {self.last_epoch + 1}")
        self.last_epoch = epoch
        if epoch in c.reuse:
            # Picking all data back up restarts the cycle, and so also the interval clock. Algorithm 1
            # as printed sets only T_start here; read literally, T_previous stays at the last drop of
            # the first cycle, `tau - T_previous == I` never holds again once alpha is set, and the
            # ImageNet preset (W=10, I=2, p=0.9, alpha=10, R=30/60/90) spends ~96% instead of the
            # paper's 75%. Resetting T_previous too reproduces every Computation figure of Tables 2
            # and 3 and both ImageNet presets (74%, 86%); tests/test_schedule.py checks all of them.
            self.t_start = epoch
            self.t_previous = epoch
            return REUSE
        if epoch <= c.warmup:
            return WARMUP
        if epoch - self.t_previous == c.interval:
            if c.active is None or epoch - self.t_start < c.active:
                self.t_previous = epoch
                return DROP
        return KEEP

    def state_dict(self) -> dict:
        return {"t_start": self.t_start, "t_previous": self.t_previous, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.t_start = int(state["t_start"])
        self.t_previous = int(state["t_previous"])
        self.last_epoch = int(state["last_epoch"])


def keep_count(n: int, keep: float) -> int:
    """Samples kept when dropping to fraction ``keep`` of ``n``: floor(p * n), at least 1."""
    return max(1, min(n, math.floor(keep * n + 1e-9)))  # 1e-9 absorbs float error such as 0.7 * 10 = 6.9999


@dataclass
class Plan:
    """What a schedule trains: ``subset_sizes[i]`` samples in epoch i + 1, ``events[i]`` at its end."""

    config: DaPConfig
    num_samples: int
    subset_sizes: list[int]
    events: list[str]

    @property
    def samples_trained(self) -> int:
        return sum(self.subset_sizes)

    @property
    def compute_fraction(self) -> float:
        return self.samples_trained / (self.config.epochs * self.num_samples)

    def to_dict(self) -> dict:
        return {
            "dap": self.config.to_dict(),
            "num_samples": self.num_samples,
            "compute_fraction": self.compute_fraction,
            "samples_trained": self.samples_trained,
            "subset_sizes": self.subset_sizes,
            "events": self.events,
        }


def plan(config: DaPConfig, num_samples: int = IMAGENET_NUM_SAMPLES) -> Plan:
    """Simulate the schedule on ``num_samples`` samples; subset sizes match the sampler's exactly."""
    _check(isinstance(num_samples, int) and num_samples >= 1, "num-samples", "an integer >= 1", num_samples)
    schedule = DaPSchedule(config)
    size, sizes, events = num_samples, [], []
    for epoch in range(1, config.epochs + 1):
        sizes.append(size)
        action = schedule.step(epoch)
        if action == DROP:
            size = keep_count(size, config.keep)
        elif action == REUSE:
            size = num_samples
        events.append(action)
    return Plan(config, num_samples, sizes, events)


def solve_keep(
    target: float,
    *,
    epochs: int,
    warmup: int,
    interval: int,
    active: int | None = None,
    reuse: tuple[int, ...] = (),
    num_samples: int = IMAGENET_NUM_SAMPLES,
    tol: float = 1e-6,
) -> tuple[float, float]:
    """Find the keep fraction p whose plan lands closest to compute fraction ``target``.

    Compute is non-decreasing in p, so bisection on p in (0, 1] suffices. Returns (p, compute).
    A target below what p -> 0 can reach (warm-up and reuse epochs always train on all data)
    returns the smallest reachable p with its compute; the caller reports the shortfall.
    """
    _check(isinstance(target, (int, float)) and 0.0 < target <= 1.0, "dap-target-compute", "in (0, 1]", target)

    def compute(p: float) -> float:
        cfg = DaPConfig(epochs=epochs, warmup=warmup, interval=interval, keep=p, active=active, reuse=reuse)
        return plan(cfg, num_samples).compute_fraction

    lo, hi = 1e-6, 1.0
    if compute(hi) <= target:
        return hi, compute(hi)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if compute(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda p: abs(compute(p) - target))
    return round(best, 6), compute(round(best, 6))
