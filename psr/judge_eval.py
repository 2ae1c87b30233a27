"""How good is the model as a step judge? ``psr judge-eval``.

On held-out correct-vs-corrupted step pairs of the built-in task (test split, so never seen in
EFT training), or on any labelled pairs file whose ``chosen`` is the right step: accuracy (the
aggregated verdict prefers the right step), per-order accuracy, agreement between the two
orders, and position bias (share of "A" among all single-order verdicts).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from psr.config import ConfigError, check_at_least
from psr.engines import GenerationConfig, load_generator, release
from psr.files import DataError, iter_jsonl, write_json_atomic
from psr.judge import JudgeConfig
from psr.models import ModelOptions
from psr.self_judges import make_judge
from psr.tasks import TaskConfig, make_task


@dataclass
class JudgeEvalConfig(ModelOptions):
    """``psr judge-eval``: the model as a pairwise step judge on held-out right-vs-wrong step pairs."""

    model: str = "smollm2-135m"  # the model: hub id, local directory, or a built-in name (smollm2-135m, tiny-random)
    task: TaskConfig = field(default_factory=TaskConfig)  # built-in pairs: the arithmetic task's test split
    pairs_file: str | None = None  # labelled pairs (prompt/chosen/rejected, chosen = right); else built-in pairs
    limit: int | None = 200  # pairs to judge (null: all of pairs_file; 200 built-in ones)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # how the judge is asked and its verdicts combined
    seed: int = 0  # which held-out pairs
    dtype: str | None = None  # float32, bfloat16, float16 or auto (null: float32 on CPU, bfloat16 on CUDA)
    out: str | None = None  # write the result JSON here
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the engine that judges (hf or vllm)

    def __post_init__(self):
        check_at_least(self, 1, "limit")


def heldout_step_pairs(task, limit: int, seed: int = 0, split: str = "test") -> list[dict]:
    """Right step vs a corruption of it, at a random step of each held-out problem; corruption kinds cycle."""
    rng = random.Random(f"judge-pairs-{split}-{seed}")
    return [{"question": s.problem.question, "previous_steps": s.previous_steps, "chosen": s.chosen,
             "rejected": s.rejected, "kind": s.kind, "step_index": s.step_index, "problem_id": s.problem.id}
            for s in task.step_pairs(split, limit, seed, rng, cycle_kinds=True)]


def _labelled_pairs(path: str, limit: int | None) -> list[dict]:
    rows = []
    for lineno, row in iter_jsonl(path):
        for fld in ("chosen", "rejected"):
            if not isinstance(row.get(fld), str):
                raise DataError(f"{path}:{lineno}: missing field '{fld}'")
        if "question" not in row and "prompt" not in row:
            raise DataError(f"{path}:{lineno}: missing field 'question' (or 'prompt')")
        rows.append({"question": row.get("question", row.get("prompt")),
                     "previous_steps": row.get("previous_steps", []), "chosen": row["chosen"],
                     "rejected": row["rejected"], "kind": row.get("kind", "labelled")})
    return rows[:limit] if limit else rows


def judge_eval(cfg: JudgeEvalConfig, model=None, tokenizer=None) -> dict:
    loaded = model is None
    if loaded:
        model, tokenizer = load_generator(cfg.model, dtype=cfg.dtype, gen=cfg.generation, options=cfg)
    pairs = (_labelled_pairs(cfg.pairs_file, cfg.limit) if cfg.pairs_file
             else heldout_step_pairs(make_task(cfg.task), cfg.limit or 200, cfg.seed))
    judge = make_judge(model, tokenizer, cfg.judge)
    if judge is None:
        raise ConfigError("judge-eval: mode truth is the task's own check (always right); choose a model judge")
    comps = judge.compare([(r["question"], r["previous_steps"], [r["chosen"], r["rejected"]]) for r in pairs])
    if loaded:
        release(model)

    by_kind = defaultdict(list)
    a_share, per_order, agree = [], [], []
    by_agg = {"agree": [], "sum": []}
    decided = []  # pairs where the aggregated verdict clears the tie rule (what the search can act on)
    for r, c in zip(pairs, comps):
        first, second = c.order_scores["0,1"], c.order_scores["1,0"]  # right step shown as A, then as B
        numeric = cfg.judge.mode != "generate"  # P(A), or a self-judge's analogue (psr.self_judges)
        if numeric:
            says_a = [first > 0.5, second > 0.5]
        else:
            says_a = [None if v is None else v == "A" for v in (first, second)]
        right = [says_a[0] is True, says_a[1] is False]
        correct = c.wins[0][1] == 1
        if numeric and cfg.judge.aggregation == "sum":
            # the summed direction: judge.tie_margin decides whether the search may act on a verdict, not
            # which way it points (with the margin, a judge at chance would score 0 here, not 0.5)
            correct = first > second
        decided.append(bool(c.wins[0][1] or c.wins[1][0]))
        # both aggregations, whatever the config: "agree" needs both orders right; "sum" (logits) compares
        # P(right) summed over the orders, (generate) counts the orders that chose the right step
        by_agg["agree"].append(right[0] and right[1])
        votes = [v for v in (says_a[0], None if says_a[1] is None else not says_a[1]) if v is not None]
        by_agg["sum"].append(first > second if numeric else 2 * sum(votes) > len(votes) > 0)
        by_kind[r["kind"]].append(correct)
        per_order += right
        a_share += [x for x in says_a if x is not None]
        agree.append(right[0] == right[1] and None not in says_a)
        r.update(correct=correct, verdicts=[first, second])
    n = max(1, len(pairs))
    result = {
        "model": cfg.model, "n": len(pairs), "mode": cfg.judge.mode, "aggregation": cfg.judge.aggregation,
        "accuracy": sum(r["correct"] for r in pairs) / n,
        "accuracy_by_aggregation": {k: sum(v) / n for k, v in by_agg.items()},
        "per_order_accuracy": sum(per_order) / max(1, len(per_order)),
        "order_agreement": sum(agree) / n,
        "decided": sum(decided) / n,
        "position_bias_share_A": sum(a_share) / max(1, len(a_share)),
        "unparseable": sum(c.unparseable for c in comps),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "config": asdict(cfg),
        "pairs": pairs,
    }
    if cfg.out:
        write_json_atomic(cfg.out, result)
    return result


def format_judge_eval(r: dict) -> str:
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["by_kind"].items())
    aggs = r.get("accuracy_by_aggregation", {})
    return (f"judge ({r['mode']}, {r['aggregation']}) on {r['n']} pairs: accuracy {r['accuracy']:.3f} "
            f"(agree {aggs.get('agree', float('nan')):.3f}, sum {aggs.get('sum', float('nan')):.3f}), "
            f"per-order {r['per_order_accuracy']:.3f}, order agreement {r['order_agreement']:.3f}, "
            f"share of A {r['position_bias_share_A']:.3f}, unparseable {r['unparseable']}\nby kind: {kinds}")
