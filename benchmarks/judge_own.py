"""The judge on the model's own candidate steps (psr.judge_own), scored several ways on the *same*
candidates in one run: logits mode with the shared-prefix KV reuse, without it (the two must agree,
and the reuse path must be faster), and the summed-aggregation tie margin on and off.

    python benchmarks/judge_own.py --model runs/experiment/init/model --problems 40 --width 4 \
        --out results/judge_own/m1.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from psr.judge import JudgeConfig, StepJudge
from psr.judge_own import mixed_steps, own_candidates, score_own
from psr.models import load_model
from psr.tasks import ArithmeticTask

VARIANTS = {
    "reuse": JudgeConfig(aggregation="sum", prefix_reuse=True),
    "plain": JudgeConfig(aggregation="sum", prefix_reuse=False),
    "reuse_no_tie_margin": JudgeConfig(aggregation="sum", prefix_reuse=True, tie_margin=0.0),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=40, help="held-out problems (test split)")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="results/judge_own/bench.json")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    task = ArithmeticTask(min_steps=2, max_steps=4, max_operand=20)  # the experiment's task
    problems = task.problems("test", args.problems, seed=args.seed)
    started = time.perf_counter()
    steps = own_candidates(model, tok, task, problems, width=args.width, seed=args.seed)
    sampled = time.perf_counter() - started
    result = {"model": args.model, "problems": args.problems, "width": args.width, "threads": torch.get_num_threads(),
              "candidate_seconds": round(sampled, 1), "steps": len(steps), "mixed_steps": len(mixed_steps(steps)),
              "no_right_candidate": round(sum(not any(c is True for c in s["candidate_correct"])
                                              for s in steps) / len(steps), 4),
              "variants": {}}
    scores = {}
    for name in args.variants:
        judge = StepJudge(model, tok, VARIANTS[name])
        start = time.perf_counter()
        summary = score_own(judge, steps)
        seconds = time.perf_counter() - start
        comparisons = summary["mixed_steps"] * args.width * (args.width - 1)
        summary.update(seconds=round(seconds, 2), comparisons_per_second=round(comparisons / seconds, 2))
        result["variants"][name] = summary
        scores[name] = [c.order_scores for c in judge.compare(
            [(s["question"], s["previous_steps"], s["candidates"]) for s in mixed_steps(steps)[:8]])]
        print(name, json.dumps(summary))
    if "reuse" in scores and "plain" in scores:  # the cache must not change a single P(A)
        diffs = [abs(a[k] - b[k]) for a, b in zip(scores["reuse"], scores["plain"]) for k in a]
        result["reuse_vs_plain_max_abs_diff"] = max(diffs) if diffs else None
        v = result["variants"]
        result["reuse_speedup"] = round(v["plain"]["seconds"] / v["reuse"]["seconds"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
