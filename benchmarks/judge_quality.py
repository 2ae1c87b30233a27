"""How well does each model judge steps? Three measures, every model in one run (same problems, same pairs):

1. **its own candidates** (psr.judge_own): held-out arithmetic problems, ``width`` EDT candidates after each
   right prefix, exact labels; at the mixed steps, how often the judge keeps a right candidate vs a
   random pick (with the 95% interval and the paired z against random);
2. **held-out built-in pairs**: the arithmetic task's test split, reference step vs a corruption (judge-eval);
3. **real-text GSM8K pairs**: rows never trained on, a reference step vs the same step with its result
   changed (the number after the last ``=``);
4. optionally (``--fit EFT.jsonl``) **the pairs it was trained on**: a judge at chance there did not even
   fit its data (too few steps/examples), one that fits them but not 1-3 does not generalise.

    python benchmarks/judge_quality.py --models smollm2-135m runs/a/init/model runs/b/init/model \
        --gsm8k ../shared/data/gsm8k/train.jsonl --out results/judge_quality/m1.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from psr.engines import GenerationConfig, is_engine, load_generator, release
from psr.files import write_json_atomic, write_text_atomic
from psr.judge import JudgeConfig, StepJudge
from psr.judge_eval import JudgeEvalConfig, judge_eval
from psr.judge_own import own_candidates, score_own, wilson
from psr.models import load_model
from psr.tasks import ArithmeticTask, TaskConfig
from psr.tasks.jsonl import gsm8k_reference_steps, read_rows

_RESULT = re.compile(r"=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")


def gsm8k_result_pairs(path: str, n: int, offset: int, seed: int = 0) -> list[dict]:
    """Reference step vs the same step with its result changed, at a random non-final step of each row."""
    rng = random.Random(seed)
    pairs = []
    for _, row in read_rows(path)[offset:]:
        steps = gsm8k_reference_steps(row["answer"])
        ks = [k for k in range(len(steps) - 1) if _RESULT.findall(steps[k])]
        if not ks:
            continue
        k = rng.choice(ks)
        m = list(_RESULT.finditer(steps[k]))[-1]
        value = float(m.group(1).replace(",", ""))
        new = value + rng.choice([-10, -2, -1, 1, 2, 10]) if value >= 10 else value + rng.choice([1, 2, 3])
        new_text = str(int(new)) if new == int(new) else str(new)
        wrong = steps[k][: m.start(1)] + new_text + steps[k][m.end(1):]
        # the same number later in the step (e.g. "... = 24 clips. She sold 24") changes with it
        wrong = wrong.replace(f" {m.group(1)} ", f" {new_text} ")
        pairs.append({"question": row["question"], "previous_steps": steps[:k], "chosen": steps[k], "rejected": wrong,
                      "kind": "gsm8k_result"})
        if len(pairs) >= n:
            break
    return pairs


def eft_training_pairs(path: str, out: str, n: int) -> str:
    """The (right, wrong) pairs of an EFT file (rows with verdict A: step_a is the right one; the other
    order of each pair is its B row), as judge-eval's labelled pairs."""
    pairs = [{"question": r["question"], "previous_steps": r["previous_steps"], "chosen": r["step_a"],
              "rejected": r["step_b"], "kind": r.get("corruption") or r.get("source") or "eft"}
             for _, r in read_rows(path) if r.get("verdict") == "A"][:n]
    write_text_atomic(out, "".join(json.dumps(p) + "\n" for p in pairs))
    return out


def measure(name: str, args, gsm_file: str | None, done: list[dict]) -> dict:
    gen = GenerationConfig(backend=args.backend)
    model, tok = load_generator(name, gen=gen)
    task = ArithmeticTask(min_steps=2, max_steps=4, max_operand=20)  # the experiment's task
    out = {"model": name, "backend": args.backend}
    t = time.perf_counter()
    steps = own_candidates(model, tok, task, task.problems("test", args.problems, seed=args.seed), width=args.width,
                           seed=args.seed, progress=False)
    # the search's tie rule (margin 0.1) and the judge's bare lean (margin 0), from the same calls; the
    # likelihood view scores candidates with the HF model (a vLLM engine has no forward pass to call)
    policy = load_model(name)[0] if is_engine(model) else model
    out["own"] = score_own(StepJudge(model, tok, JudgeConfig(aggregation="sum")), steps, margins=(0.0,),
                           likelihood=True, policy=policy)
    out["own"]["seconds"] = round(time.perf_counter() - t, 1)
    _save(args, done + [out])  # each measure as soon as it is known: a killed run keeps what it measured
    if args.own_only:
        release(model)
        return out
    judge = JudgeConfig(aggregation="sum")
    builtin = judge_eval(JudgeEvalConfig(model=name, task=TaskConfig(name="arithmetic", min_steps=2, max_steps=4,
                                                                     max_operand=20),
                                         limit=args.pairs, judge=judge, seed=args.seed), model, tok)
    out["builtin"] = _pairs_summary(builtin)
    _save(args, done + [out])
    if gsm_file:
        real = judge_eval(JudgeEvalConfig(model=name, pairs_file=gsm_file, limit=args.pairs, judge=judge), model, tok)
        out["gsm8k"] = _pairs_summary(real)
        _save(args, done + [out])
    for fit in args.fit or []:
        pairs = eft_training_pairs(fit, str(Path(args.out).with_suffix(f".fit{args.fit.index(fit)}.jsonl")), args.pairs)
        r = judge_eval(JudgeEvalConfig(model=name, pairs_file=pairs, limit=args.pairs, judge=judge), model, tok)
        out.setdefault("fit", {})[fit] = _pairs_summary(r)
        _save(args, done + [out])
    release(model)
    print(json.dumps(out))
    return out


def _save(args, results: list[dict]) -> None:
    write_json_atomic(args.out, {"args": vars(args), "results": results})


def _pairs_summary(r: dict) -> dict:
    k = round(r["accuracy_by_aggregation"]["sum"] * r["n"])  # summed P(right) over both orders > 0.5
    return {"n": r["n"], "accuracy_sum": round(k / r["n"], 4), "interval": wilson(k, r["n"]),
            "order_agreement": round(r["order_agreement"], 4), "share_A": round(r["position_bias_share_A"], 4),
            "by_kind": r["by_kind"]}


def _acc(s: dict | None) -> str:
    return f"{s['accuracy_sum']:.2f} ({s['interval'][0]:.2f}–{s['interval'][1]:.2f})" if s else "—"


def table(results: list[dict]) -> str:
    lines = ["| model | own steps: kept right (95% CI) | ties | kept right, margin 0 (95% CI) | random | gain z "
             "(margin 0) | mixed n | built-in pairs (95% CI) | GSM8K real-text pairs (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, b, g = r["own"], r.get("builtin"), r.get("gsm8k")
        own = f"{o['kept_right']:.2f} ({o['kept_right_interval'][0]:.2f}–{o['kept_right_interval'][1]:.2f})" \
            if o["mixed_steps"] else "—"
        z = o.get("by_margin", {}).get("0.0")
        own0 = f"{z['kept_right']:.2f} ({z['kept_right_interval'][0]:.2f}–{z['kept_right_interval'][1]:.2f})" \
            if z and o["mixed_steps"] else "—"
        rnd = o["random_right"] if o["mixed_steps"] else "—"
        lines.append(f"| {r['model']} | {own} | {o['ties']} | {own0} | {rnd} | {z['gain_z'] if z else '—'} "
                     f"| {o['mixed_steps']} | "
                     f"{_acc(b)} | {_acc(g)} |")
    fits = [(r["model"], f, v) for r in results for f, v in (r.get("fit") or {}).items()]
    if fits:
        lines += ["", "| model | its training pairs (EFT file) | n | summed accuracy (95% CI) |", "|---|---|---|---|"]
        lines += [f"| {m} | {f} | {v['n']} | {v['accuracy_sum']:.2f} ({v['interval'][0]:.2f}–{v['interval'][1]:.2f}) |"
                  for m, f, v in fits]
    likes = [(r["model"], r["own"]["likelihood"]) for r in results if r["own"].get("likelihood")]
    if likes:
        lines += ["", "| model | judge sides with the likelier candidate (pairs) | same, right-vs-wrong pairs | "
                  "likeliest candidate kept right (95% CI) |", "|---|---|---|---|"]
        lines += [f"| {m} | {v['judge_sides_with_likelier']} ({v['pairs']}) | "
                  f"{v['judge_sides_with_likelier_right_vs_wrong']} ({v['pairs_right_vs_wrong']}) | "
                  f"{v['likeliest_kept_right']} ({v['likeliest_kept_right_interval'][0]:.2f}–"
                  f"{v['likeliest_kept_right_interval'][1]:.2f}) |" for m, v in likes]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--problems", type=int, default=60, help="held-out arithmetic problems for the own-candidates test")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=200, help="built-in and GSM8K pairs")
    ap.add_argument("--gsm8k", help="GSM8K JSONL for real-text pairs (rows from --gsm8k-offset on)")
    ap.add_argument("--gsm8k-offset", type=int, default=7000, help="rows before this may be used for training")
    ap.add_argument("--fit", nargs="*", help="EFT files the models were trained on: the judge on those pairs")
    ap.add_argument("--own-only", action="store_true", help="only the own-candidates measure (and its likelihood view)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="engine for candidates and judging")
    ap.add_argument("--out", default="results/judge_quality/judge_quality.json")
    args = ap.parse_args()
    gsm_file = None
    if args.gsm8k:
        gsm_file = str(Path(args.out).with_suffix(".gsm8k_pairs.jsonl"))
        pairs = gsm8k_result_pairs(args.gsm8k, args.pairs, args.gsm8k_offset, args.seed)
        write_text_atomic(gsm_file, "".join(json.dumps(p) + "\n" for p in pairs))
    results = []
    for m in args.models:
        results.append(measure(m, args, gsm_file, results))
    _save(args, results)
    write_text_atomic(Path(args.out).with_suffix(".md"), table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
