"""M0 vs M1 after ``psr init``: solve accuracy (``psr eval``: greedy, held-out arithmetic problems)
and step-judge accuracy (``psr judge-eval``: logits mode, held-out right-vs-corrupted step pairs,
both orders), for each model given, plus the init run's training log. Writes a JSON and a
markdown table.

    python benchmarks/init_quality.py --models smollm2-135m runs/smollm2/init/model runs/smollm2/init_lora/model \
        --out results/init/quality

Models that do not exist yet are skipped (run ``make init`` first), so ``make bench`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from psr.evaluate import EvalConfig, evaluate
from psr.files import write_json_atomic, write_text_atomic
from psr.judge_eval import JudgeEvalConfig, judge_eval
from psr.models import BUILTIN_MODELS, load_model
from psr.tasks import TaskConfig


def measure(name: str, limit: int, judge_limit: int, max_new_tokens: int, batch_size: int) -> dict:
    model, tok = load_model(name, device="cpu")
    t0 = time.perf_counter()
    ev = evaluate(EvalConfig(model=name, task=TaskConfig(name="arithmetic"), limit=limit, max_new_tokens=max_new_tokens,
                             batch_size=batch_size), model=model, tokenizer=tok, progress=False)
    t1 = time.perf_counter()
    je = judge_eval(JudgeEvalConfig(model=name, limit=judge_limit), model=model, tokenizer=tok)
    t2 = time.perf_counter()
    row = {
        "model": name, "solve_accuracy": ev["accuracy"], "solve_n": ev["n"],
        "solve_by_difficulty": {k: v["accuracy"] for k, v in ev["by_difficulty"].items()},
        "judge_accuracy_both_orders_agree": je["accuracy"], "judge_per_order_accuracy": je["per_order_accuracy"],
        "judge_order_agreement": je["order_agreement"], "judge_share_A": je["position_bias_share_A"],
        "judge_by_kind": je["by_kind"], "judge_n_pairs": je["n"],
        "eval_seconds": round(t1 - t0, 1), "judge_seconds": round(t2 - t1, 1),
        "sample_outputs": [p["output"] for p in ev["problems"][:2]],
    }
    log = Path(name) / "train_log.json"
    if log.exists():
        t = json.loads(log.read_text())
        losses = [h["loss"] for h in t["log_history"] if "loss" in h]
        row["train"] = {"examples": t.get("examples"), "steps": t["timing"].get("steps"),
                        "median_s_per_step": t["timing"].get("median_s_per_step"),
                        "total_s": t["timing"].get("total_s"),
                        "peak_rss_mb": t.get("peak_rss_mb"), "lora": t["config"]["lora"],
                        "learning_rate": t["config"]["learning_rate"], "batch_size": t["config"]["batch_size"],
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | solve acc. | judge per-order acc. | judge acc. (both orders agree) | share of A | train |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("train")
        train = (f"{'LoRA' if t['lora'] else 'full'}, {t['steps']} steps, {t['median_s_per_step']} s/step, "
                 f"loss {t['first_loss']:.2f}→{t['last_loss']:.2f}") if t else "—"
        lines.append(f"| `{r['model']}` | {r['solve_accuracy']:.3f} (n={r['solve_n']}) | "
                     f"{r['judge_per_order_accuracy']:.3f} | {r['judge_accuracy_both_orders_agree']:.3f} "
                     f"(n={r['judge_n_pairs']}) | {r['judge_share_A']:.3f} | {train} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "runs/smollm2/init/model"])
    ap.add_argument("--limit", type=int, default=50, help="held-out problems for solve accuracy")
    ap.add_argument("--judge-limit", type=int, default=100, help="held-out step pairs for judge accuracy (x2 orders)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        if name not in BUILTIN_MODELS and not Path(name).exists():
            print(f"skipped {name}: not found (run `make init` first)")
            continue
        rows.append(measure(name, args.limit, args.judge_limit, args.max_new_tokens, args.batch_size))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    if args.out and rows:
        write_json_atomic(f"{args.out}.json", {"rows": rows, "args": vars(args)})
        write_text_atomic(f"{args.out}.md", markdown(rows))
        print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
