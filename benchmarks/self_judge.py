"""Which self-judge carries signal on the model's own steps? Every judge mode scores the *same* candidates
(the model's own next steps after each right prefix of held-out problems, labelled by the task's exact
step check): at the mixed steps (some candidates right, some not), how often the judge's best candidate is
right, against a random pick among the same candidates (paired per step: gain and its z).

    python benchmarks/self_judge.py --model runs/exp4/init/model --problems 60 --backend vllm \
        --out results/self_judge/m1.json

Modes (``--modes``): ``logits`` (the paper's judge asked with P(A)/P(B), summed over both orders; ``logits0``:
margin 0, its lean), ``generate`` (the paper's judge writing its reply, greedy, both orders: a judge trained on
``justification_kind: recompute`` rows reasons before its verdict; its replies go to ``<out>.replies.jsonl`` and
its reasoning lines are checked against the truth), ``likelihood`` (``likelihood_min``: by the least likely
token) and ``consistency`` (psr.self_judges; no ground truth, no judge question). Candidates, generate-mode
replies and consistency rollouts run on ``--backend``; logits and likelihood read an HF copy of the model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psr.engines import GenerationConfig, load_generator  # noqa: E402
from psr.judge import JudgeConfig  # noqa: E402
from psr.judge_own import mixed_steps, own_candidates, reasoning_lines, score_own  # noqa: E402
from psr.models import load_model  # noqa: E402
from psr.self_judges import make_judge  # noqa: E402
from psr.tasks import ArithmeticTask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--problems", type=int, default=60, help="held-out problems (arithmetic test split)")
    ap.add_argument("--offset", type=int, default=1000, help="skip the test problems the benchmarks evaluate on")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--rollouts", type=int, nargs="+", default=[4], help="consistency: rollouts per candidate")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--task", type=int, nargs=3, default=[2, 4, 20], metavar=("MIN_STEPS", "MAX_STEPS", "MAX_OPERAND"),
                    help="the arithmetic task (default: the experiment's; the demo's is 2 3 10)")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--modes", nargs="+", default=["logits", "logits0", "likelihood", "consistency"],
                    choices=["logits", "logits0", "likelihood", "likelihood_min", "consistency", "generate"])
    ap.add_argument("--generate-tokens", type=int, default=96, help="generate mode: new tokens per reply")
    ap.add_argument("--out", default="results/self_judge/bench.json")
    args = ap.parse_args()
    task = ArithmeticTask(min_steps=args.task[0], max_steps=args.task[1], max_operand=args.task[2])
    problems = task.problems("test", args.problems, seed=args.seed, offset=args.offset)
    engine, tok = load_generator(args.model, gen=GenerationConfig(backend=args.backend))
    started = time.perf_counter()
    steps = own_candidates(engine, tok, task, problems, width=args.width, seed=args.seed)
    result = {"command": "python benchmarks/self_judge.py " + " ".join(sys.argv[1:]), "model": args.model,
              "task": args.task,
              "problems": args.problems, "width": args.width, "steps": len(steps),
              "mixed_steps": len(mixed_steps(steps)), "candidate_seconds": round(time.perf_counter() - started, 1),
              "modes": {}}
    needs_hf = {"logits", "logits0", "likelihood", "likelihood_min"} & set(args.modes)
    hf = engine if args.backend == "hf" or not needs_hf else load_model(args.model)[0]
    judges = {}
    if "logits" in args.modes:
        judges["logits (margin 0.1)"] = (hf, JudgeConfig(aggregation="sum"))
    if "logits0" in args.modes:
        judges["logits (margin 0: its lean)"] = (hf, JudgeConfig(aggregation="sum", tie_margin=0.0))
    if "generate" in args.modes:
        judges["generate (both orders, margin 0)"] = (engine, JudgeConfig(
            mode="generate", aggregation="sum", tie_margin=0.0, max_new_tokens=args.generate_tokens, batch_size=64))
    if "likelihood" in args.modes:
        judges["likelihood"] = (hf, JudgeConfig(mode="likelihood", tie_margin=0.0))
    if "likelihood_min" in args.modes:
        judges["likelihood (min token)"] = (hf, JudgeConfig(mode="likelihood", tie_margin=0.0,
                                                             likelihood_reduction="min"))
    if "consistency" in args.modes:
        for k in args.rollouts:
            judges[f"consistency ({k} rollouts)"] = (engine, JudgeConfig(mode="consistency", tie_margin=0.0,
                                                                          consistency_rollouts=k))
    by_id = {p.id: p for p in problems}
    for name, (model, cfg) in judges.items():
        start = time.perf_counter()
        summary = score_own(make_judge(model, tok, cfg), steps)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        replies = summary.pop("replies", None)
        if replies is not None:
            summary["reasoning"] = reasoning_lines(task, by_id, replies)
            path = Path(args.out).with_suffix(".replies.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in replies))
        result["modes"][name] = summary
        print(f"{name:<30} kept right {summary['kept_right']} {summary['kept_right_interval']} vs random "
              f"{summary['random_right']} (gain {summary['gain_over_random']}, z {summary['gain_z']}), "
              f"ties {summary['ties']}, {summary['seconds']} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
