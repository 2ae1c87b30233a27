"""Issue 30: build-eft's search, lockstep vs in-flight, in one run (same problems, model, engine, process).

Lockstep is ``search_chunk`` over chunks of ``--chunk`` problems (each chunk proposes, then annotates, step
after step); in-flight is ``InflightEFT`` (every problem in flight, its candidates and rollouts sent as soon
as it is ready for them). Reported per engine: wall time, candidates/s, rollouts/s, and how many problems'
step rows agree (both drivers seed every candidate and rollout alike, so where the engine's numerics do not
depend on batching the rows are equal; a problem that differs is reported with its first differing step).

    python benchmarks/build_eft_engine.py [--engine vllm|hf|both] [--problems 16] [--hf-problems 4]
        [--annotator rollout] [--width 4] [--rollouts 4] [--max-steps 3] [--chunk 8]
        [--out results/search_engine/build_eft.json]

On this CPU: ``--engine hf --model tiny-random --problems 2`` runs in seconds (a check that it runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def by_problem(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["problem_id"], []).append(r)
    return out


def driver_stats(rows: list[dict], cfg, seconds: float) -> dict:
    from psr.build_eft import needs_rollouts

    cands = sum(len(r["candidates"]) for r in rows)
    rollouts = (cfg.rollouts * sum(needs_rollouts(c) and s is not None for r in rows
                                   for c, s in zip(r["candidates"], r["rollout_shares"] or [])))
    return {"seconds": round(seconds, 2), "steps": sum(not r.get("too_long") for r in rows), "candidates": cands,
            "rollouts": rollouts, "candidates_per_second": round(cands / seconds, 3),
            "rollouts_per_second": round(rollouts / seconds, 3),
            "right": sum(x is True for r in rows for x in r["labels"]),
            "pairs": sum(len(r["pairs"]) for r in rows)}


def compare_drivers(name: str, model, tok, task, problems, cfg, chunk: int) -> dict:
    from psr.build_eft import ROLLOUT_SAMPLING, annotate, model_completer, search_chunk, search_inflight

    propose = model_completer(model, tok, cfg, cfg.sampling, cfg.max_step_tokens, stop_at_step=True)
    rollout = model_completer(model, tok, cfg, ROLLOUT_SAMPLING, cfg.rollout_max_new_tokens, stop_at_step=False)
    annotate_fn = annotate(task, cfg, rollout)
    start = time.perf_counter()
    lock = [r for i in range(0, len(problems), chunk) for r in search_chunk(problems[i : i + chunk], propose,
                                                                            annotate_fn, cfg)]
    lock_s = time.perf_counter() - start
    start = time.perf_counter()
    infl = search_inflight(problems, task, model, tok, cfg, unit_size=chunk)
    infl_s = time.perf_counter() - start
    out = {"problems": len(problems), "lockstep": driver_stats(lock, cfg, lock_s),
           "inflight": driver_stats(infl, cfg, infl_s)}
    out["wall_lockstep_over_inflight"] = round(lock_s / infl_s, 2)
    out["candidates_per_second_inflight_over_lockstep"] = round(
        out["inflight"]["candidates_per_second"] / max(out["lockstep"]["candidates_per_second"], 1e-9), 2)
    a, b = by_problem(lock), by_problem(infl)
    out["problems_equal"] = sum(a[p] == b.get(p) for p in a)
    out["first_differing_step"] = {p: next((k for k, (x, y) in enumerate(zip(a[p], b.get(p, []))) if x != y),
                                           min(len(a[p]), len(b.get(p, []))))
                                   for p in a if a[p] != b.get(p)}
    print(name, json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--engine", choices=["vllm", "hf", "both"], default="both")
    ap.add_argument("--problems", type=int, default=16, help="problems on vLLM")
    ap.add_argument("--hf-problems", type=int, default=4, help="problems on HF")
    ap.add_argument("--annotator", choices=["exact", "rollout"], default="rollout")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--rollout-max-new-tokens", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=16, help="lockstep chunk size (build-eft's default)")
    ap.add_argument("--batch-size", type=int, default=48, help="HF: sequences per generate call")
    ap.add_argument("--inflight", type=int, default=64, help="in-flight: problems in flight")
    ap.add_argument("--out", default="results/search_engine/build_eft.json")
    args = ap.parse_args()
    engines = ["vllm", "hf"] if args.engine == "both" else [args.engine]
    if "vllm" in engines:
        from common import vllm_missing

        if vllm_missing("benchmarks/build_eft_engine.py"):
            return
    import torch

    from psr.build_eft import BuildEFTConfig
    from psr.tasks import ArithmeticTask

    task = ArithmeticTask()
    cfg = BuildEFTConfig(model=args.model, annotator=args.annotator, width=args.width, rollouts=args.rollouts,
                         max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                         rollout_max_new_tokens=args.rollout_max_new_tokens, chunk_size=args.chunk,
                         batch_size=args.batch_size, inflight=args.inflight)
    result = {"model": args.model, "threads": torch.get_num_threads(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "engine")}}
    problems = task.problems("train", max(args.problems, args.hf_problems), seed=9)
    for name in engines:
        n = args.problems if name == "vllm" else args.hf_problems
        if not n:
            continue
        if name == "vllm":
            from psr.engines import GenerationConfig, load_generator

            model, tok = load_generator(args.model, gen=GenerationConfig(backend="vllm"))
        else:
            from psr.models import load_model

            model, tok = load_model(args.model)
        from psr.build_eft import search_inflight

        search_inflight(problems[:1], task, model, tok, BuildEFTConfig(**{**cfg.__dict__, "max_steps": 1}))  # warm-up
        result[name] = compare_drivers(name, model, tok, task, problems[:n], cfg, args.chunk)
        if name == "vllm":
            model.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
