"""Issue 30: the search's use of the engine, in one run (same problems, model, engines, process):

1. a PSR search round, lockstep (``search_chunk`` over chunks of ``--chunk`` problems, as ``run_search`` did)
   vs in-flight (``psr.inflight``, every problem in flight), on vLLM and on HF: wall time, candidates/s,
   judge comparisons/s, and how many per-problem traces agree. Both drivers use per-request seeds (run seed,
   problem, step, attempt, candidate), so where the engine's numerics do not depend on batching the traces
   are equal; a trace that differs is reported with the step where it first differs.
2. judge comparisons/s, vLLM (prefix caching) vs HF (shared-prefix KV reuse), ``StepJudge.compare`` on the
   same items.

    python benchmarks/search_engine.py [--problems 16] [--hf-problems 8] [--width 6] [--max-steps 3]
        [--out results/search_engine/bench.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def first_difference(a: dict, b: dict):
    for k, (x, y) in enumerate(zip(a["events"], b["events"])):
        if x != y:
            return k
    return min(len(a["events"]), len(b["events"]))


def round_stats(traces, seconds):
    cands = sum(len(e["candidates"]) for t in traces for e in t["events"])
    comps = sum(len(e["judgments"]) for t in traces for e in t["events"])
    return {"seconds": round(seconds, 1), "candidates": cands, "comparisons": comps,
            "candidates_per_second": round(cands / seconds, 3), "comparisons_per_second": round(comps / seconds, 3),
            "statuses": {s: sum(t["status"] == s for t in traces) for s in {t["status"] for t in traces}},
            "ties": sum(bool(e.get("tie")) for t in traces for e in t["events"]),
            "rolled_back": sum(bool(e.get("rolled_back")) for t in traces for e in t["events"])}


def compare_drivers(name, model, tok, task, problems, cfg, chunk):
    from psr.inflight import search_inflight
    from psr.judge import StepJudge
    from psr.search import model_proposer, search_chunk

    judge = StepJudge(model, tok, cfg.judge)
    start = time.perf_counter()
    lock = [t for i in range(0, len(problems), chunk)
            for t in search_chunk(problems[i : i + chunk], task, model_proposer(model, tok, cfg), judge, cfg)]
    lock_s = time.perf_counter() - start
    start = time.perf_counter()
    infl = search_inflight(problems, task, model, tok, judge, cfg, unit_size=chunk)
    infl_s = time.perf_counter() - start
    out = {"problems": len(problems), "lockstep": round_stats(lock, lock_s), "inflight": round_stats(infl, infl_s)}
    out["wall_lockstep_over_inflight"] = round(lock_s / infl_s, 2)
    out["candidates_per_second_inflight_over_lockstep"] = round(
        out["inflight"]["candidates_per_second"] / out["lockstep"]["candidates_per_second"], 2)
    out["traces_equal"] = sum(a == b for a, b in zip(lock, infl))
    out["first_differing_event"] = {a["problem_id"]: first_difference(a, b) for a, b in zip(lock, infl) if a != b}
    print(name, json.dumps(out), flush=True)
    return out, lock, infl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=16, help="search problems on vLLM")
    ap.add_argument("--hf-problems", type=int, default=8, help="search problems on HF (0: skip)")
    ap.add_argument("--width", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8, help="lockstep chunk size (run_search's default)")
    ap.add_argument("--judge-items", type=int, default=8)
    ap.add_argument("--out", default="results/search_engine/bench.json")
    args = ap.parse_args()
    from common import vllm_missing

    if vllm_missing("benchmarks/search_engine.py"):
        return
    import torch
    from search import judge_items

    from psr.engines import GenerationConfig, load_generator
    from psr.judge import JudgeConfig, StepJudge
    from psr.models import load_model
    from psr.search import SearchConfig
    from psr.tasks import ArithmeticTask

    engine, tok = load_generator(args.model, gen=GenerationConfig(backend="vllm"))
    model, _ = load_model(args.model)
    task = ArithmeticTask()
    cfg = SearchConfig(model=args.model, width=args.width, max_steps=args.max_steps, chunk_size=args.chunk)
    result = {"model": args.model, "threads": torch.get_num_threads(), "width": args.width,
              "max_steps": args.max_steps, "chunk": args.chunk}
    # warm-up both engines (first calls pay one-time costs)
    items = judge_items(task, args.judge_items, args.width)
    for m in (model, engine):
        StepJudge(m, tok, JudgeConfig()).compare(items[:1])

    # judge comparisons/s, same items, both engines
    n = sum(len(c) * (len(c) - 1) for _, _, c in items)
    judge = {}
    for name, m in (("hf", model), ("vllm", engine)):
        start = time.perf_counter()
        StepJudge(m, tok, JudgeConfig()).compare(items)
        judge[name] = round(n / (time.perf_counter() - start), 3)
    judge["vllm_over_hf"] = round(judge["vllm"] / judge["hf"], 2)
    judge["comparisons"] = n
    result["judge_comparisons_per_second"] = judge
    print("judge", json.dumps(judge), flush=True)

    problems = task.problems("train", args.problems, seed=9)
    result["vllm"], lock, infl = compare_drivers("vllm", engine, tok, task, problems, cfg, args.chunk)
    if args.hf_problems:
        result["hf"], _, _ = compare_drivers("hf", model, tok, task, problems[: args.hf_problems], cfg, args.chunk)
    engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    rows = [{"driver": d, **t} for d, ts in (("lockstep", lock), ("inflight", infl)) for t in ts]
    Path(args.out).with_suffix(".traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
