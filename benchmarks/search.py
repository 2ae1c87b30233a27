"""Benchmark the data-generation stage on the embedded model, in one run (same machine state):

1. judge comparisons per second: ``logits`` mode with KV prefix reuse vs ``logits`` without reuse
   vs ``generate`` mode (goal: logits + reuse >= 5x generate);
2. candidate steps per second inside the search vs the model's raw batched decoding rate at the
   same batch size (goal: the search's useful tokens/s >= 70% of raw tokens/s).

    python benchmarks/search.py [--model smollm2-135m] [--items 4] [--width 6] [--out results/search/bench.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from psr.judge import JudgeConfig, StepJudge
from psr.models import load_model
from psr.sampling import SamplingConfig
from psr.search import SearchConfig, model_proposer, search_chunk
from psr.steps import render_prompt
from psr.tasks import ArithmeticTask
from psr.tasks.arithmetic import CORRUPTIONS


def judge_items(task, n_items: int, width: int):
    """Realistic judge workloads: a step of a held-out problem, the right step and corruptions of it."""
    rng = random.Random(0)
    items = []
    for p in task.problems("test", n_items, seed=1):
        k = rng.randrange(len(p.reference_steps))
        cands = [p.reference_steps[k]] + [task.corrupt_step(p, k, CORRUPTIONS[i % 4], rng) for i in range(width - 1)]
        items.append((p.question, p.reference_steps[:k], cands))
    return items


def time_judge(model, tok, items, cfg: JudgeConfig) -> dict:
    judge = StepJudge(model, tok, cfg)
    judge.compare(items[:1])  # warm-up
    start = time.perf_counter()
    comps = judge.compare(items)
    seconds = time.perf_counter() - start
    n = sum(len(c) * (len(c) - 1) for _, _, c in items)
    return {"comparisons": n, "seconds": round(seconds, 3), "per_second": round(n / seconds, 2),
            "unparseable": sum(c.unparseable for c in comps)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=4, help="judge workloads (steps) for the logits modes")
    ap.add_argument("--generate-items", type=int, default=2, help="fewer for generate mode: it decodes")
    ap.add_argument("--width", type=int, default=6)
    ap.add_argument("--problems", type=int, default=8, help="problems searched together for the decoding test")
    ap.add_argument("--raw-tokens", type=int, default=48)
    ap.add_argument("--out", default="results/search/bench.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    task = ArithmeticTask()
    items = judge_items(task, args.items, args.width)
    result = {"model": args.model, "width": args.width, "threads": torch.get_num_threads(), "judge": {}}

    # 1. judge modes, one after the other in the same process
    result["judge"]["logits_reuse"] = time_judge(model, tok, items, JudgeConfig(mode="logits", prefix_reuse=True))
    result["judge"]["logits_plain"] = time_judge(model, tok, items, JudgeConfig(mode="logits", prefix_reuse=False))
    result["judge"]["generate"] = time_judge(model, tok, items[: args.generate_items], JudgeConfig(mode="generate"))
    j = result["judge"]
    reuse = j["logits_reuse"]["per_second"]
    result["judge"]["speedup_reuse_vs_generate"] = round(reuse / j["generate"]["per_second"], 2)
    result["judge"]["speedup_reuse_vs_plain"] = round(reuse / j["logits_plain"]["per_second"], 2)
    print(json.dumps(result["judge"], indent=2))

    # 2. candidate generation inside the search vs raw decoding at the same batch size
    cfg = SearchConfig(model=args.model, width=args.width, max_steps=2, chunk_size=args.problems,
                       batch_size=args.problems * args.width, sampling=SamplingConfig(policy="edt"))
    problems = task.problems("train", args.problems, seed=5)
    base = model_proposer(model, tok, cfg)
    spent = {"seconds": 0.0, "candidates": 0, "tokens": 0}

    def timed_propose(batch):
        start = time.perf_counter()
        out = base(batch)
        spent["seconds"] += time.perf_counter() - start
        flat = [c for cands in out for c in cands]
        spent["candidates"] += len(flat)
        spent["tokens"] += sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in flat)
        return out

    torch.manual_seed(0)
    search_chunk(problems, task, timed_propose, StepJudge(model, tok, JudgeConfig()), cfg)
    prompts = [render_prompt(tok, p.question) for p in problems]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, num_return_sequences=args.width, max_new_tokens=args.raw_tokens,
                       min_new_tokens=args.raw_tokens, pad_token_id=tok.pad_token_id,
                       **SamplingConfig(policy="edt").generate_kwargs())
    raw_seconds = time.perf_counter() - start
    raw_tps = len(prompts) * args.width * args.raw_tokens / raw_seconds
    search_tps = spent["tokens"] / spent["seconds"]
    result["decoding"] = {
        "batch_size": len(prompts) * args.width,
        "search_candidates": spent["candidates"], "search_seconds": round(spent["seconds"], 2),
        "search_candidates_per_second": round(spent["candidates"] / spent["seconds"], 3),
        "search_tokens_per_second": round(search_tps, 2), "raw_tokens_per_second": round(raw_tps, 2),
        "search_over_raw": round(search_tps / raw_tps, 3),
        "mean_candidate_tokens": round(spent["tokens"] / max(1, spent["candidates"]), 1),
    }
    print(json.dumps(result["decoding"], indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
