"""Which memory allocator setting is fastest on CPU: glibc, jemalloc, jemalloc that never purges.

Each setting runs the same two workloads in a fresh process (the allocator is chosen at exec time
with ``LD_PRELOAD`` / ``MALLOC_CONF``), interleaved over ``--rounds`` so that machine noise hits
all settings alike:

- decoding: ``model.generate`` on ``--batch`` held-out arithmetic prompts, ``--tokens`` new tokens
  each (greedy, every row forced to full length): tokens/s;
- training: one forward + backward + AdamW step of full fine-tuning on a batch of 8 x 256 tokens: s/step.

Kernel (system) CPU time is reported beside wall time: page faults on freshly mapped memory show up there.

    python benchmarks/malloc.py [--rounds 2] [--out results/malloc.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

JEMALLOC = next((p for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                             "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2") if os.path.exists(p)), None)
SETTINGS = {
    "glibc": {},
    "jemalloc": {"LD_PRELOAD": JEMALLOC or ""},
    "jemalloc_no_decay": {"LD_PRELOAD": JEMALLOC or "", "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}


def worker(batch: int, tokens: int) -> dict:
    import torch

    from psr.models import load_model
    from psr.steps import render_prompt
    from psr.tasks import ArithmeticTask

    model, tok = load_model("smollm2-135m")
    prompts = [render_prompt(tok, p.question) for p in ArithmeticTask().problems("test", batch)]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def timed(fn) -> tuple[float, float]:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - t0, r1.ru_stime - r0.ru_stime

    def decode():
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    decode()  # warm-up
    dec_s, dec_sys = timed(decode)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randint(100, 20000, (8, 256), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # warm-up (optimizer state is allocated here)
    steps = [timed(step) for _ in range(2)]
    return {"decode_tokens_per_s": batch * tokens / dec_s, "decode_sys_share": dec_sys / dec_s / 2,
            "train_s_per_step": statistics.mean(s for s, _ in steps),
            "train_sys_share": statistics.mean(k / s / 2 for s, k in steps)}  # share of 2 cores' time in the kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default="results/malloc.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.batch, args.tokens)))
        return
    settings = {k: v for k, v in SETTINGS.items() if k == "glibc" or JEMALLOC}
    runs = {k: [] for k in settings}
    for r in range(args.rounds):
        for name in (list(settings) if r % 2 == 0 else list(reversed(settings))):
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")} | settings[name]
            cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} worker failed:\n{out.stderr[-2000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    summary = {name: {k: round(statistics.mean(x[k] for x in rs), 3) for k in rs[0]} for name, rs in runs.items()}
    base = summary["glibc"]
    for s in summary.values():
        s["decode_speedup_vs_glibc"] = round(s["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        s["train_speedup_vs_glibc"] = round(base["train_s_per_step"] / s["train_s_per_step"], 2)
    result = {"batch": args.batch, "tokens": args.tokens, "rounds": args.rounds, "summary": summary, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| allocator | decode tok/s | kernel share | train s/step | kernel share "
          "| decode / train speed-up vs glibc |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['decode_tokens_per_s']:.1f} | {s['decode_sys_share']:.0%} | "
              f"{s['train_s_per_step']:.2f} | {s['train_sys_share']:.0%} | "
              f"{s['decode_speedup_vs_glibc']}x / {s['train_speedup_vs_glibc']}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
