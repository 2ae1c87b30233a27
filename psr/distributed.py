"""Which process am I? Works alone, under ``accelerate launch`` and under ``torchrun``.

Also what several processes need besides that: the process group's timeout (``PSR_DIST_TIMEOUT``),
a way to share one value (rank 0's) with every rank, and :func:`fresh_state`, which every stage of
the loop starts with so that nothing a training stage left behind (DeepSpeed's global config, the
accelerator's state, memory) changes how a later stage loads its model.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch

from psr.files import ResourceError

# How long a collective (a barrier, a broadcast) may wait for the slowest rank. NCCL's default is
# 10 minutes and a rank that evaluates or saves a 7B model can take longer; one that takes hours is stuck.
DEFAULT_TIMEOUT_S = 3 * 3600


def timeout_seconds() -> int:
    """The process group's timeout: ``PSR_DIST_TIMEOUT`` (seconds), default 3 hours."""
    raw = os.environ.get("PSR_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        from psr.config import ConfigError

        raise ConfigError(f"PSR_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


# Exit status of a run that stopped itself before the job's time limit (state saved): SLURM scripts requeue it.
PREEMPTED_EXIT = 3


class Preempted(ResourceError):
    """The job's time is nearly up (``PSR_STOP_AT``) or it was signalled: the stage saved its state and stopped;
    the same command resumes it (the SLURM scripts requeue the job)."""


def stop_at() -> float | None:
    """``PSR_STOP_AT``: when to stop (seconds since the epoch), set by the SLURM scripts from the job's end
    time less a margin, so that a training stage saves a checkpoint and the loop stops before SLURM kills it."""
    raw = os.environ.get("PSR_STOP_AT", "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        from psr.config import ConfigError

        raise ConfigError(f"PSR_STOP_AT must be a time in seconds since the epoch, got {raw!r}") from None


def past_stop_time() -> bool:
    import time

    deadline = stop_at()
    return deadline is not None and time.time() >= deadline


def context():
    """``(rank, world_size, barrier)``; sets up the process group when launched with several processes."""
    if _in_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Without a GPU accelerate only sets up gloo when asked for the CPU explicitly.
        state = PartialState(cpu=not use_cuda(), timeout=timedelta(seconds=timeout_seconds()))
        return state.process_index, state.num_processes, state.wait_for_everyone
    return 0, 1, lambda: None


def _in_group() -> bool:
    """Is this process one of several in a process group? An in-process vLLM engine sets up a group of
    one (gloo) for itself: that is not a world to wait for, and it may be gone by the next barrier."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(value, src: int = 0):
    """``value`` as rank ``src`` has it, on every rank (any picklable object; alone: ``value`` itself)."""
    if not _in_group():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def close() -> None:
    """Leave the process group, if this process is in one (at the end of a command)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fresh_state() -> None:
    """Forget what an earlier stage in this process left behind, keeping the process group.

    A training stage under DeepSpeed registers its config globally in transformers (a weak reference
    that accelerate's state keeps alive): with ZeRO-3 every later ``from_pretrained`` in the process
    then builds the model sharded (``zero.Init``), and a stage that loads a model for generation gets
    empty parameters or waits forever for ranks that do not load it. Building a TRL config under a
    DeepSpeed launcher (a ``trl:`` block is checked that way) registers it too.
    """
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # transformers without the DeepSpeed integration
        pass
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)  # the process group stays
        GradientState._reset_state()
    except ImportError:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_memory() -> dict | None:
    """This process's GPU memory in GiB (what torch has allocated and reserved, what the device has free), or
    None without CUDA. The loop stores it before and after every stage, so a stage that does not hand its
    memory back is seen in its marker (and ``make gpu-check`` asserts it)."""
    if not use_cuda():
        return None
    free, total = torch.cuda.mem_get_info()
    gib = 2**30
    return {"allocated_gib": round(torch.cuda.memory_allocated() / gib, 3),
            "reserved_gib": round(torch.cuda.memory_reserved() / gib, 3),
            "free_gib": round(free / gib, 3), "total_gib": round(total / gib, 3)}


def use_cuda() -> bool:
    """CUDA when the machine has it, unless the launcher asked for the CPU (accelerate config ``use_cpu: true``
    or ``--cpu``): two CPU ranks must not both take the one GPU over NCCL."""
    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def device_for(rank: int) -> str:
    """This process's device: its GPU on this machine (``LOCAL_RANK`` under a launcher), or the CPU."""
    local = int(os.environ.get("LOCAL_RANK", rank))
    return f"cuda:{local % torch.cuda.device_count()}" if use_cuda() else "cpu"
