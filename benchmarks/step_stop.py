"""The step stop's cost per decode step (issue 30): the check before issue 30 re-decoded every row's whole
completion at every decode step (``FullDecodeStepStopping``: O(length) per step, quadratic over a
completion); ``StepBoundaryStopping`` / the vLLM processor feed only the new token to a ``StepStopTracker``.

For each completion length L, a batch of rows holding L output tokens of the embedded model's tokenizer with
no stop in them (so no row stops early): time one decode step's check (old: the criterion on the whole batch;
new: the trackers fed the completion token by token, the median step cost over the 32 steps before L), per
row, medians (this CPU is shared: means are noisy). Goal: new flat (<= 1.2x from 128 to 2,048).

    python benchmarks/step_stop.py [--rows 16] [--out results/search_engine/step_stop.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="results/search_engine/step_stop.json")
    args = ap.parse_args()
    import torch

    from psr.generation import FullDecodeStepStopping, StepBoundaryStopping, StepStopTracker
    from psr.models import load_tokenizer

    tok = load_tokenizer(args.model)
    sentence = ("First we add the apples and the pears, 17 + 25 = 42, then we take away 9 to get 33; "
                "the farmer's crates hold 33 * 4 = 132 fruits in all, so we keep going.\n")
    unit = tok(sentence, add_special_tokens=False)["input_ids"]
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = (unit * (max(lengths) // len(unit) + 2))[: max(lengths)]
    prompt = tok("Question?", add_special_tokens=False)["input_ids"]
    result = {"model": args.model, "rows": args.rows, "threads": torch.get_num_threads(), "lengths": {}}
    # new: stream every row token by token, as decoding does, and keep each step's cost
    live, trackers = [[] for _ in range(args.rows)], [StepStopTracker(tok) for _ in range(args.rows)]
    step_cost = []
    for k in range(max(lengths)):
        start = time.perf_counter()
        for t, row in zip(trackers, live):
            row.append(ids[k])
            t.update(row)
        step_cost.append((time.perf_counter() - start) / args.rows * 1e6)
    for n in lengths:
        batch = torch.tensor([prompt + ids[:n]] * args.rows)
        old = FullDecodeStepStopping(tok, len(prompt))
        assert not old(batch, None).any()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            old(batch, None)
            times.append((time.perf_counter() - start) / args.rows * 1e6)
        old_us = statistics.median(times)
        new_us = statistics.median(step_cost[n - 32 : n])  # the 32 decode steps before length n
        # the HF criterion as generate calls it (one new column per call): its step at length n
        hf = []
        for _ in range(args.repeats):
            crit = StepBoundaryStopping(tok, len(prompt))
            crit(batch[:, :-1], None)
            start = time.perf_counter()
            crit(batch, None)
            hf.append((time.perf_counter() - start) / args.rows * 1e6)
        result["lengths"][n] = {"old_us_per_row_step": round(old_us, 1), "new_us_per_row_step": round(new_us, 1),
                                "new_hf_criterion_us_per_row_step": round(statistics.median(hf), 1),
                                "old_over_new": round(old_us / new_us, 1)}
        print(n, json.dumps(result["lengths"][n]), flush=True)
    lo, hi = result["lengths"][lengths[0]], result["lengths"][lengths[-1]]
    result["old_growth"] = round(hi["old_us_per_row_step"] / lo["old_us_per_row_step"], 2)
    result["new_growth"] = round(hi["new_us_per_row_step"] / lo["new_us_per_row_step"], 2)
    print(json.dumps({"old_growth": result["old_growth"], "new_growth": result["new_growth"]}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
