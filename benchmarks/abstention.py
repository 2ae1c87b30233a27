"""Can a self-judge tell, without the truth, that none of its candidates is right? At every judged step of a
self-judged search round (a run's ``search.jsonl``: the candidates it judged, with the task's truth logged for
measuring only), this scores truth-free signals the model has and asks how well each separates

- steps where some candidate is right from steps where none is (a judge that abstains on the second kind
  makes no wrong-over-wrong pair), and
- steps where the likeliest candidate (the likelihood judge's choice) is right from those where it is wrong,

as an AUC (0.5: no separation), and what abstaining below each quartile of the signal would keep. Signals:
``likelihood`` (the chosen candidate's mean per-token log-probability), ``margin`` (its lead over the next
distinct candidate), ``agreement`` (the share of candidates whose result, the boxed answer or else the last
number, equals the chosen one's) and, with ``--rollouts K``, ``consensus`` (self-consistency: the share of K
rollouts from every candidate that reach the answer most of them reach; psr.self_judges).

    python benchmarks/abstention.py runs/v4_s0_lastans/psr/round_1/search.jsonl --model runs/v4_s0/init/model \
        --backend vllm --rollouts 4 --out results/experiment_v4/s0/abstention.json

``--model`` must be the model that searched that round (for round 1, the run's M1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psr.answers import flexible_answer  # noqa: E402
from psr.engines import GenerationConfig, load_generator  # noqa: E402
from psr.judge import JudgeConfig  # noqa: E402
from psr.judge_own import candidate_loglik  # noqa: E402
from psr.self_judges import ConsistencyJudge  # noqa: E402


def step_result(step: str) -> str | None:
    """What a step computes: its boxed answer, else its last number (the lenient reading of psr.answers)."""
    return flexible_answer(step)


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a positive scores above a negative), ties half (the Mann-Whitney AUC)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def judged_steps(path: str) -> list[dict]:
    """The round's judged steps with at least two distinct candidates (identical ones leave nothing to judge)."""
    steps = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        trace = json.loads(line)
        for e in trace["events"]:
            if len(set(e["candidates"])) >= 2:
                steps.append({"question": trace["question"], "previous_steps": e["previous_steps"],
                              "candidates": e["candidates"], "right": [r is True for r in e["candidate_correct"]]})
    return steps


def signals(steps: list[dict], model, tok, rollouts: int) -> None:
    """Adds each step's truth-free signals (and its chosen candidate) in place."""
    import torch

    with torch.no_grad():
        lls = candidate_loglik(model, tok, steps, "mean")
    for s, ll in zip(steps, lls):
        order = sorted(range(len(ll)), key=lambda i: -ll[i])
        top = order[0]
        runner_up = next((ll[i] for i in order[1:] if s["candidates"][i] != s["candidates"][top]), ll[top])
        results = [step_result(c) for c in s["candidates"]]
        s.update(chosen=top, likelihood=ll[top], margin=ll[top] - runner_up,
                 agreement=sum(r is not None and r == results[top] for r in results) / len(results))
    if rollouts:
        judge = ConsistencyJudge(model, tok, JudgeConfig(mode="consistency", tie_margin=0.0,
                                                          consistency_rollouts=rollouts))
        comps = judge.compare([(s["question"], s["previous_steps"], s["candidates"]) for s in steps])
        for s, comp in zip(steps, comps):
            shares = comp.consistency["shares"]
            s["consensus"] = sum(shares) / len(shares)


def measure(steps: list[dict], name: str) -> dict:
    some = [s[name] for s in steps if any(s["right"])]
    none = [s[name] for s in steps if not any(s["right"])]
    right = [s[name] for s in steps if s["right"][s["chosen"]]]
    wrong = [s[name] for s in steps if not s["right"][s["chosen"]]]
    ranked = sorted(s[name] for s in steps)
    keep = []
    for q in (0.25, 0.5, 0.75):
        t = ranked[int(q * len(ranked))]
        kept = [s for s in steps if s[name] >= t]
        keep.append({"abstain_below_quantile": q, "threshold": round(t, 4), "kept_steps": len(kept),
                     "kept_with_no_right_candidate": sum(not any(s["right"]) for s in kept),
                     "kept_chosen_right": sum(s["right"][s["chosen"]] for s in kept)})
    return {"auc_some_right_vs_none": auc(some, none), "auc_chosen_right_vs_wrong": auc(right, wrong),
            "abstain": keep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("search", help="a self-judged round's search.jsonl")
    ap.add_argument("--model", required=True, help="the model that searched that round")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--rollouts", type=int, default=0, help="consensus: rollouts per candidate (0: skip)")
    ap.add_argument("--out")
    args = ap.parse_args()
    steps = judged_steps(args.search)
    if not steps:
        sys.exit(f"{args.search}: no judged step with two distinct candidates")
    engine, tok = load_generator(args.model, gen=GenerationConfig(backend=args.backend))
    started = time.perf_counter()
    signals(steps, engine, tok, args.rollouts)
    names = ["likelihood", "margin", "agreement"] + (["consensus"] if args.rollouts else [])
    out = {"command": "python benchmarks/abstention.py " + " ".join(sys.argv[1:]),
           "judged_steps": len(steps), "with_no_right_candidate": sum(not any(s["right"]) for s in steps),
           "chosen_right": sum(s["right"][s["chosen"]] for s in steps),
           "seconds": round(time.perf_counter() - started, 1), "signals": {n: measure(steps, n) for n in names}}
    print(f"{out['judged_steps']} judged steps, {out['with_no_right_candidate']} with no right candidate, "
          f"likeliest candidate right at {out['chosen_right']}")
    for n, m in out["signals"].items():
        print(f"{n:<11} AUC some-right vs none {m['auc_some_right_vs_none']}, chosen right vs wrong "
              f"{m['auc_chosen_right_vs_wrong']}; abstaining below the median keeps "
              f"{m['abstain'][1]['kept_steps']} steps, {m['abstain'][1]['kept_with_no_right_candidate']} with no right "
              f"candidate, chosen right {m['abstain'][1]['kept_chosen_right']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
