"""Evaluation with and without stopping each row at its answer's line (``EvalConfig.stop_at_answer``), one
run, same problems: the time saved and whether any graded answer changed (it must not).

    python benchmarks/eval_stop.py --model runs/experiment/init/model --limit 100 --out results/eval/stop.json
"""

from __future__ import annotations

import argparse
import json

from psr.evaluate import EvalConfig, evaluate
from psr.files import write_json_atomic
from psr.models import load_model
from psr.tasks import TaskConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", default="results/eval/stop.json")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    task = TaskConfig(name="arithmetic", min_steps=2, max_steps=4, max_operand=20)
    runs = {}
    for stop in (True, False):
        cfg = EvalConfig(model=args.model, task=task, limit=args.limit, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, stop_at_answer=stop)
        runs[stop] = evaluate(cfg, model, tok, progress=False)
    on, off = runs[True], runs[False]
    same = sum(a["pred"] == b["pred"] for a, b in zip(on["problems"], off["problems"]))
    result = {"model": args.model, "n": on["n"], "accuracy_stop": on["accuracy"], "accuracy_no_stop": off["accuracy"],
              "same_graded_answer": same, "seconds_stop": on["throughput"]["seconds"],
              "seconds_no_stop": off["throughput"]["seconds"],
              "time_ratio": round(on["throughput"]["seconds"] / off["throughput"]["seconds"], 3)}
    print(json.dumps(result, indent=2))
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
