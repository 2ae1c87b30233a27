"""Training speed and memory, in one run on identical pairs:

- step-DPO (``psr train``'s StepDPOTrainer) vs a plain TRL ``DPOTrainer`` with the same settings
  (goal: at most 5% slower, no more memory);
- step-DPO with LoRA vs full fine-tuning;
- step-DPO with and without jemalloc (``LD_PRELOAD``);
- SFT (``psr init``) seconds per step.

Every variant runs in a fresh process (peak RSS is per process) and the variants are interleaved
over ``--rounds`` so that other jobs on a shared machine slow them alike; quote the ratios.

    python benchmarks/train.py                                 # SmolLM2-135M, the CPU defaults
    python benchmarks/train.py --model tiny-random --steps 4   # seconds, for a smoke test
    python benchmarks/train.py --out results/train/bench       # also writes .json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JEMALLOC = next((p for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                             "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2") if Path(p).exists()), None)

# name -> (stage, trainer, lora, jemalloc)
VARIANTS = {
    "step_dpo_full": ("dpo", "step", False, True),
    "plain_trl_dpo_full": ("dpo", "plain", False, True),
    "step_dpo_lora": ("dpo", "step", True, True),
    "plain_trl_dpo_lora": ("dpo", "plain", True, True),
    "step_dpo_full_glibc": ("dpo", "step", False, False),
    "sft_full": ("sft", None, False, True),
}


def worker(args) -> None:
    """One variant in this process: build the trainer, train ``--steps`` steps, report timing and memory."""
    import torch
    from trl import DPOTrainer

    from psr.train.common import peak_rss_mb, step_stats

    stage, kind, lora, _ = VARIANTS[args.worker]
    common = dict(model=args.model, out=str(Path(args.tmp) / args.worker), max_steps=args.steps, lora=lora,
                  report_to=[], progress=False, seed=0, max_length=512)
    if stage == "dpo":
        from psr.train.step_dpo import StepDPOConfig, build_trainer

        cfg = StepDPOConfig(pairs=args.pairs, batch_size=args.batch_size, beta=0.4,
                            learning_rate=2e-4 if lora else 2e-6, **common)
        trainer = build_trainer(cfg, trainer_class=DPOTrainer) if kind == "plain" else build_trainer(cfg)
        tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in trainer.train_dataset)
        tokens_per_pair = tokens / len(trainer.train_dataset)
    else:
        from psr.train.sft import InitConfig, build_trainer

        n = args.steps * args.sft_batch_size
        cfg = InitConfig(batch_size=args.sft_batch_size, ift_examples=n // 2, eft_examples=n - n // 2,
                         eft_both_orders=True, learning_rate=3e-5, **common)
        trainer = build_trainer(cfg)
        tokens_per_pair = sum(len(r["input_ids"]) for r in trainer.train_dataset) / len(trainer.train_dataset)
    trainer.train()
    hist = [h for h in trainer.state.log_history if "loss" in h]
    out = {"variant": args.worker, **step_stats(trainer.psr_timer.seconds), "peak_rss_mb": round(peak_rss_mb(), 1),
           "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
           "threads": torch.get_num_threads(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
           "tokens_per_example": round(tokens_per_pair, 1), "last_loss": hist[-1]["loss"] if hist else None,
           "last_margin": hist[-1].get("rewards/margins") if hist else None}
    Path(args.json).write_text(json.dumps(out))


def run_variant(name: str, args, pairs: str, tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if not JEMALLOC and name == "step_dpo_full_glibc":  # without jemalloc it is step_dpo_full again
        return {"variant": name, "skipped": "libjemalloc.so.2 not found"}
    if VARIANTS[name][3] and JEMALLOC:
        env["LD_PRELOAD"] = JEMALLOC
    out = Path(tmp) / f"{name}.json"
    cmd = [sys.executable, __file__, "--worker", name, "--json", str(out), "--pairs", pairs, "--tmp", tmp,
           "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--sft-batch-size", str(args.sft_batch_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = round(time.perf_counter() - t0, 1)
    return result


def summarize(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    table = {}
    for name, rs in by.items():
        ok = [r for r in rs if "median_s_per_step" in r]
        if not ok:
            table[name] = {"skipped": rs[0].get("skipped")}
            continue
        table[name] = {"s_per_step": round(statistics.median(r["median_s_per_step"] for r in ok), 3),
                       "s_per_step_each_round": [r["median_s_per_step"] for r in ok],
                       "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in ok), 1),
                       "peak_gpu_mb": ok[0].get("peak_gpu_mb"),
                       "tokens_per_example": ok[0]["tokens_per_example"], "rounds": len(ok)}

    def ratio(a, b, key):
        if table.get(a, {}).get(key) and table.get(b, {}).get(key):
            return round(table[a][key] / table[b][key], 3)
        return None

    # Per-round paired ratios (same round = same load) are the robust number on a shared machine.
    def paired(a, b):
        pa = [r for r in runs if r["variant"] == a and "median_s_per_step" in r]
        pb = [r for r in runs if r["variant"] == b and "median_s_per_step" in r]
        vals = [x["median_s_per_step"] / y["median_s_per_step"] for x, y in zip(pa, pb)]
        return [round(v, 3) for v in vals]

    ratios = {
        "step_dpo / plain_trl_dpo (full): time": ratio("step_dpo_full", "plain_trl_dpo_full", "s_per_step"),
        "step_dpo / plain_trl_dpo (full): time, per round": paired("step_dpo_full", "plain_trl_dpo_full"),
        "step_dpo / plain_trl_dpo (full): peak memory": ratio("step_dpo_full", "plain_trl_dpo_full", "peak_rss_mb"),
        "step_dpo / plain_trl_dpo (full): peak GPU memory": ratio("step_dpo_full", "plain_trl_dpo_full", "peak_gpu_mb"),
        "step_dpo / plain_trl_dpo (lora): time": ratio("step_dpo_lora", "plain_trl_dpo_lora", "s_per_step"),
        "step_dpo / plain_trl_dpo (lora): peak memory": ratio("step_dpo_lora", "plain_trl_dpo_lora", "peak_rss_mb"),
        "lora / full (step_dpo): time": ratio("step_dpo_lora", "step_dpo_full", "s_per_step"),
        "lora / full (step_dpo): peak memory": ratio("step_dpo_lora", "step_dpo_full", "peak_rss_mb"),
        "glibc / jemalloc (step_dpo full): time": ratio("step_dpo_full_glibc", "step_dpo_full", "s_per_step"),
        "glibc / jemalloc (step_dpo full): time, per round": paired("step_dpo_full_glibc", "step_dpo_full"),
    }
    return {"variants": table, "ratios": ratios}


def markdown(summary: dict, args) -> str:
    lines = [f"model `{args.model}`, {args.steps} steps per process (median of all but the first), DPO batch "
             f"{args.batch_size} pairs, SFT batch {args.sft_batch_size}, {args.rounds} interleaved round(s)", "",
             "| variant | s/step | peak RSS (MB) | peak GPU (MB) | tokens/example |", "|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        if "skipped" in v:
            lines.append(f"| {name} | skipped: {v['skipped']} | | | |")
        else:
            lines.append(f"| {name} | {v['s_per_step']} ({', '.join(map(str, v['s_per_step_each_round']))}) | "
                         f"{v['peak_rss_mb']} | {v['peak_gpu_mb'] or '—'} | {v['tokens_per_example']} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per process (the first is not timed)")
    ap.add_argument("--batch-size", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--sft-batch-size", type=int, default=8, help="SFT examples per step (the init recipe's)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from psr.models import load_tokenizer
    from psr.train.step_dpo import oracle_pairs

    with tempfile.TemporaryDirectory(prefix="psr-bench-train-") as tmp:
        pairs = str(Path(tmp) / "pairs.jsonl")
        rows = oracle_pairs(load_tokenizer(args.model), args.steps * args.batch_size, seed=11)
        Path(pairs).write_text("".join(json.dumps(r) + "\n" for r in rows))  # identical pairs for every variant
        runs = []
        for rnd in range(args.rounds):
            for name in args.variants:
                r = run_variant(name, args, pairs, tmp)
                r["round"] = rnd
                runs.append(r)
                print(json.dumps(r), flush=True)
        summary = summarize(runs)
    text = markdown(summary, args)
    print(text)
    if args.out:
        from psr.files import write_json_atomic, write_text_atomic

        kept = {k: v for k, v in vars(args).items() if k not in ("worker", "json", "pairs", "tmp")}
        write_json_atomic(f"{args.out}.json", {**summary, "runs": runs, "args": kept})
        write_text_atomic(f"{args.out}.md", text)
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
