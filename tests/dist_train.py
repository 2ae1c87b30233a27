"""Launched by tests/test_distributed.py under ``accelerate launch``: a few steps of step-DPO (or SFT)
on tiny-random through the ordinary entry points; every rank then writes a checksum of its weights.
``dist_train.py train|init DATA OUT CHECKSUMS [precompute]`` (precompute: precompute_ref_log_probs)."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


class Checksum(TrainerCallback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        h, total = hashlib.sha256(), 0.0
        for name, p in sorted(model.state_dict().items()):
            t = p.detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode() + t.numpy().tobytes())
            total += t.double().sum().item()
        rank = int(os.environ.get("RANK", "0"))
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "sha256": h.hexdigest(),
            "sum": total, "device": str(args.device), "backend": str(args.ddp_backend),
            "distributed_type": str(args.distributed_state.distributed_type), "steps": state.global_step}))


def main(stage: str, data: str, out: str, checksums: str, *options: str):
    common = dict(model="tiny-random", out=out, batch_size=2, max_steps=3, learning_rate=1e-3, progress=False,
                  report_to=[], seed=0)
    if stage == "train":
        from psr.train.step_dpo import StepDPOConfig, run_train

        run_train(StepDPOConfig(pairs=data, beta=0.1, precompute_ref_log_probs="precompute" in options, **common),
                  callbacks=[Checksum(checksums)])
    else:
        from psr.train.sft import InitConfig, run_init

        run_init(InitConfig(ift_examples=8, eft_examples=8, **common), callbacks=[Checksum(checksums)])


if __name__ == "__main__":
    main(*sys.argv[1:])
