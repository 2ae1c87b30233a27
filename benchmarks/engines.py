"""HF vs vLLM as psr's engine, in one run (same process, same prompts, same thread count), on the
embedded model; both sides go through psr's own code paths (``generate``, ``StepJudge``, ``search_chunk``):

1. search candidate steps/s: ``width`` EDT candidates of the next step for each of ``--problems`` search
   states, stopped at the next step marker (HF: the search's batch of 48 sequences);
2. judge comparisons/s: logits mode, every ordered pair of ``width`` candidates (HF: its shared-prefix KV
   reuse; vLLM: prefix caching), and the largest |P(A) difference| between the two;
3. evaluation problems/s: greedy solutions stopped at the answer's line, and how many equal HF's;
4. a search round: PSR's step-wise search (candidates + judge + tie rule) on ``--round-problems`` problems.

Runs where vLLM imports (``make bench-vllm``, in .venv-vllm). Goal (issue 18): vLLM >= 2x HF for the
search and the judge on a CPU.

    python benchmarks/engines.py [--threads 1] [--problems 16] [--out results/engines/bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def both(engines, fn) -> dict:
    """``fn(model)`` on each engine, HF first; {name: (result, seconds)}."""
    return {name: timed(fn, model) for name, model in engines.items()}


def rates(timings: dict, count: int, unit: str) -> dict:
    out = {name: {"seconds": round(s, 2), f"{unit}_per_second": round(count / s, 3)}
           for name, (_, s) in timings.items()}
    out["vllm_over_hf"] = round(timings["hf"][1] / timings["vllm"][1], 2)
    out[unit] = count
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both engines (default: vLLM's own binding)")
    ap.add_argument("--problems", type=int, default=16, help="search states for the candidate test; eval problems x2")
    ap.add_argument("--judge-items", type=int, default=8, help="steps whose width candidates are judged")
    ap.add_argument("--width", type=int, default=6)
    ap.add_argument("--round-problems", type=int, default=8, help="problems of the search round (0: skip it)")
    ap.add_argument("--out", default="results/engines/bench.json")
    args = ap.parse_args()
    from common import vllm_missing

    if vllm_missing("benchmarks/engines.py"):
        return
    if args.threads:  # before vLLM binds its OpenMP threads; HF in this process then uses the same ones
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    import torch
    from search import judge_items

    from psr.engines import GenerationConfig, load_generator
    from psr.generation import generate
    from psr.judge import JudgeConfig, StepJudge
    from psr.models import load_model
    from psr.sampling import SamplingConfig
    from psr.search import SearchConfig, model_proposer, search_chunk
    from psr.steps import render_prompt
    from psr.tasks import ArithmeticTask

    if args.threads:
        torch.set_num_threads(args.threads)
    (engine, tok), startup = timed(load_generator, args.model, gen=GenerationConfig(backend="vllm"))
    model, _ = load_model(args.model)
    engines = {"hf": model, "vllm": engine}
    task = ArithmeticTask()
    result = {"model": args.model, "threads": torch.get_num_threads(), "vllm_startup_seconds": round(startup, 1),
              "width": args.width}
    for m in engines.values():  # warm-up: first calls pay one-time costs on both sides
        generate(m, tok, [render_prompt(tok, "1 + 1?")], SamplingConfig(policy="edt"), 8, num_samples=2,
                 progress=False)

    # 1. candidate steps: search states at a random depth of their reference solution
    probs = task.problems("train", args.problems, seed=5)
    states = [render_prompt(tok, p.question, p.reference_steps[: i % len(p.reference_steps)])
              for i, p in enumerate(probs)]
    edt = SamplingConfig(policy="edt")

    def candidates(m):
        torch.manual_seed(0)
        return generate(m, tok, states, edt, 96, batch_size=48, num_samples=args.width, stop_at_step=True,
                        progress=False)

    t = both(engines, candidates)
    result["candidates"] = rates(t, len(states) * args.width, "candidates")
    print(json.dumps({"candidates": result["candidates"]}))

    # 2. the judge, logits mode
    items = judge_items(task, args.judge_items, args.width)
    t = both(engines, lambda m: StepJudge(m, tok, JudgeConfig()).compare(items))
    result["judge"] = rates(t, sum(len(c) * (len(c) - 1) for _, _, c in items), "comparisons")
    diffs = [abs(a.order_scores[k] - b.order_scores[k]) for a, b in zip(t["hf"][0], t["vllm"][0])
             for k in a.order_scores]
    result["judge"]["max_abs_prob_a_difference"] = float(f"{max(diffs):.2e}")
    print(json.dumps({"judge": result["judge"]}))

    # 3. evaluation: greedy whole solutions, stopped at the answer's line
    eval_prompts = [render_prompt(tok, p.question) for p in task.problems("test", 2 * args.problems, seed=0)]
    t = both(engines, lambda m: generate(m, tok, eval_prompts, SamplingConfig(policy="greedy"), 256, batch_size=32,
                                         stop_at_answer=True, progress=False))
    result["eval"] = rates(t, len(eval_prompts), "problems")
    result["eval"]["same_text_as_hf"] = sum(a == b for a, b in zip(t["hf"][0], t["vllm"][0]))
    print(json.dumps({"eval": result["eval"]}))

    # 4. a search round: candidates, judge and tie rule together
    if args.round_problems:
        cfg = SearchConfig(model=args.model, width=args.width, max_steps=4, chunk_size=args.round_problems)
        rprobs = task.problems("train", args.round_problems, seed=9)

        def round_(m):
            torch.manual_seed(0)
            return search_chunk(rprobs, task, model_proposer(m, tok, cfg), StepJudge(m, tok, cfg.judge), cfg)

        t = both(engines, round_)
        # Each engine samples its own candidates, so the rounds differ in length: compare candidates per second.
        result["search_round"] = {"problems": args.round_problems, "max_steps": cfg.max_steps}
        for name, (traces, seconds) in t.items():
            n = sum(len(e["candidates"]) for tr in traces for e in tr["events"])
            result["search_round"][name] = {"seconds": round(seconds, 2), "candidates": n,
                                            "candidates_per_second": round(n / seconds, 3)}
        r = result["search_round"]
        r["vllm_over_hf"] = round(r["vllm"]["candidates_per_second"] / r["hf"]["candidates_per_second"], 2)
        print(json.dumps({"search_round": result["search_round"]}))

    engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
