"""Launched by tests/test_cluster.py under ``accelerate launch``: sets up the process group the way psr
does (``psr.distributed.context``) and writes what each rank sees: rank, world size, the group's timeout."""

import json
import sys
from pathlib import Path

import torch


def main(folder: str):
    from psr.distributed import broadcast, close, context

    rank, world, barrier = context()
    group = torch.distributed.distributed_c10d._get_default_group()
    timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    shared = broadcast(f"from rank {rank}")  # rank 0's value on every rank
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "timeout": timeout,
                                                               "broadcast": shared}))
    barrier()
    close()  # as the psr command does at its end


if __name__ == "__main__":
    main(sys.argv[1])
