"""Which process am I? Works alone, under ``accelerate launch`` and under ``torchrun``."""

from __future__ import annotations

import os

import torch


def context():
    """``(rank, world_size, barrier)``; sets up the process group when launched with several processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.distributed.barrier
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Without a GPU accelerate only sets up gloo when asked for the CPU explicitly.
        state = PartialState(cpu=not use_cuda())
        return state.process_index, state.num_processes, state.wait_for_everyone
    return 0, 1, lambda: None


def use_cuda() -> bool:
    """CUDA when the machine has it, unless the launcher asked for the CPU (accelerate config ``use_cpu: true``
    or ``--cpu``): two CPU ranks must not both take the one GPU over NCCL."""
    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")


def device_for(rank: int) -> str:
    return f"cuda:{rank % torch.cuda.device_count()}" if use_cuda() else "cpu"
