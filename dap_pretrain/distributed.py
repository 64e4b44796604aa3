"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from dap_pretrain.errors import TORCHRUN_ENV, UsageError


def init_distributed(device: str | None = None, *, single: bool = False) -> tuple[torch.device, int, int]:
    """Initialise DDP when torchrun launched us; returns (device, rank, world_size). ``single``: one process
    whatever the environment says (``--check``: a job scheduler may have set ``WORLD_SIZE`` for the whole job).

    Backend: nccl when the device is CUDA, gloo otherwise. Without torchrun: rank 0 of 1. On CUDA each process of
    several takes the GPU of its ``LOCAL_RANK`` (an index given is overridden, with a warning, as in timm); a single
    process takes the one named (``--device cuda:1``), as timm's train.py does, and ``cuda`` is ``cuda:0``.
    """
    world = 1 if single else _env_int("WORLD_SIZE", 1)
    local_rank = 0 if single else _env_int("LOCAL_RANK", 0)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ and name != "LOCAL_RANK"]
    if world > 1 and missing and not dist.is_initialized():  # a job scheduler's WORLD_SIZE, not torchrun's
        raise UsageError(
            f"WORLD_SIZE={world} is set, but not the rest of torchrun's environment ({', '.join(missing)} unset); "
            f"unset WORLD_SIZE to train in one process, or start {world} with NPROC_PER_NODE={world} "
            "tools/pretrain.sh (or torchrun)"
        )
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _available_device(device)
    if dev.type == "cuda":
        if world > 1 and dev.index is not None and dev.index != local_rank:
            logging.getLogger(__name__).warning(
                "--device %s: under torchrun each process takes the GPU of its LOCAL_RANK, here cuda:%d (choose GPUs "
                "with CUDA_VISIBLE_DEVICES)",
                device,
                local_rank,
            )
        index = local_rank if world > 1 else (dev.index or 0)
        if index >= torch.cuda.device_count():
            fix = "start at most that many processes per node" if world > 1 else "pass a lower index"
            raise UsageError(
                f"{'LOCAL_RANK ' + str(local_rank) if world > 1 else '--device ' + device}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); {fix}"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return dev, rank, world


def _env_int(name: str, default: int, environ=None) -> int:
    """An integer environment variable, or a :class:`UsageError` naming it (``int()``'s traceback before)."""
    value = (os.environ if environ is None else environ).get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UsageError(f"{name}={value} is not a whole number; set it to one, or unset it") from None


def _available_device(name: str) -> torch.device:
    """``torch.device(name)`` if this torch can use it now, else a :class:`UsageError` naming what it sees."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name} is not a device name; pass auto, cpu or cuda") from None
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    usable = dev.type == "cpu" or bool(getattr(backend, "is_available", lambda: False)())
    if not usable:
        raise UsageError(f"--device {name}: this torch has no usable {dev.type} device; pass --device auto or cpu")
    return dev


def cuda_speed_flags(device: torch.device) -> None:
    """On CUDA, what timm's train.py sets: cuDNN times its algorithms per input shape and keeps the fastest
    (``cudnn.benchmark``), and float32 matmuls may use TF32. Process-wide; nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a short list of numbers over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def rank0_outcome(error: str | None) -> str | None:
    """Every rank learns whether rank 0's check failed (its one-line message, else None), so the other ranks
    stop with the same message instead of waiting at the next barrier until the process-group timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def busy_cores_now(interval: float = 0.2) -> float | None:
    """How many cores the machine's processes kept busy over the next ``interval`` seconds (``/proc/stat``; this
    process sleeps meanwhile), or None where there is no ``/proc/stat``."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already counted in user

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(1, total1 - total0))


def pick_threads(*, workers: int, device_type: str, environ: dict | None = None) -> tuple[int, str]:
    """torch intra-op threads for this process, and one line saying why.

    ``OMP_NUM_THREADS`` wins when set. Otherwise: the cores this process may run on (its CPU affinity), shared
    between the processes of this node (``LOCAL_WORLD_SIZE``), less one per loader worker when the model trains
    on the CPU (the workers decode at the same time), less the load other processes put on the machine: the
    1-minute load average, or what they keep busy right now (:func:`busy_cores_now`) if that is less, since the
    average still counts a job that ended a minute ago. At least 1. On a 2-core machine next to one busy process,
    torch's default of one thread per core ran the trainer at about 10 img/s against about 250 with one thread;
    right after a test run ended, the load average alone took the embedded default down to one thread (264 img/s
    against about 450 with two).
    """
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP's nested form, '4,2': 4 at the top level
    if omp:
        try:
            n = max(1, int(omp))
        except ValueError:
            raise UsageError(
                f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} is not a thread count; set a whole number, or unset it"
            ) from None
        return n, f"intra-op threads {n} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, _env_int("LOCAL_WORLD_SIZE", 1, env))
    share = max(1, cores // local)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy >= 1:  # worth a look at now: a finished job still weighs on the average for minutes
        now = busy_cores_now()
        busy = min(busy, now) if now is not None else busy
    others = int(busy // local)
    n = max(1, share - (workers if device_type == "cpu" else 0) - others)
    return n, (
        f"intra-op threads {n}: {cores} cores / {local} process(es) on this node"
        + (f" - {workers} loader workers" if device_type == "cpu" and workers else "")
        + (f" - load {busy:.1f} from other processes" if others else "")
        + " (set OMP_NUM_THREADS to choose)"
    )
