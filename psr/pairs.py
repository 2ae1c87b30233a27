"""Data generation, stage 2: step-level preference pairs from search traces.

``pairs.jsonl`` is TRL's preference format plus metadata: ``prompt`` is the rendered question
(chat template, assistant turn open) followed by the steps so far, each ending in a newline;
``chosen``/``rejected`` are single steps (no EOS: a step is not the end of an answer). SRLM rows
pair whole solutions instead (``kind: solution``). Load with ``datasets.load_dataset("json", ...)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from psr.steps import has_final_answer, render_prompt


@dataclass
class PairsConfig:
    # The chosen-minus-rejected score gap, as a share of the method's score range, must be > 0 and reach
    # this. Shares, so that it means the same for both methods: PSR's scores are win counts out of
    # width - 1, SRLM's are expected rubric points out of 5. 0.1: any win at widths up to 11 (PSR), half a
    # rubric point (SRLM).
    min_margin: float = 0.1
    max_step_tokens: int = 256  # drop pairs whose chosen or rejected is longer (tokens)
    drop_identical: bool = True  # chosen == rejected (after stripping) carries no signal
    # The paper's tie rule drops the pair of a step it rolls back. True keeps it: the comparison made
    # there still stands (with the oracle judge its chosen step is right), and it doubled the oracle's
    # clean pairs (52 -> 121 on 48 problems).
    keep_rolled_back: bool = False


SRLM_TOP_SCORE = 5  # the additive rubric's maximum (psr.srlm)


def build_pairs(traces: list[dict], tokenizer, cfg: PairsConfig | None = None, round_index: int = 1) -> list[dict]:
    cfg = cfg or PairsConfig()
    if not 0 <= cfg.min_margin <= 1:
        raise ValueError(f"pairs.min_margin is a share of the score range, in [0, 1]; got {cfg.min_margin}")
    rows = []
    for t in traces:
        if t["method"] == "srlm":
            rows += _srlm_pairs(t, tokenizer, cfg, round_index)
            continue
        for e in t["events"]:
            if e.get("worst") is None or not (e.get("kept") or (cfg.keep_rolled_back and e.get("rolled_back"))):
                continue  # ties, rolled-back steps (unless kept) and the oracle's all-right steps make no pair
            chosen, rejected = e["candidates"][e["best"]], e["candidates"][e["worst"]]
            row = _pair_row(t, tokenizer, e["previous_steps"], chosen, rejected, e["scores"][e["best"]],
                            e["scores"][e["worst"]], len(e["candidates"]) - 1, cfg, round_index, kind="step")
            if row:
                row.update(step_index=e["step_index"], chosen_correct=e["candidate_correct"][e["best"]],
                           rejected_correct=e["candidate_correct"][e["worst"]], rolled_back=bool(e.get("rolled_back")))
                rows.append(row)
    return rows


def _pair_row(t, tokenizer, previous, chosen, rejected, s_chosen, s_rejected, score_range, cfg, round_index, kind):
    if cfg.drop_identical and chosen.strip() == rejected.strip():
        return None
    if not chosen.strip() or not rejected.strip():
        return None  # an empty step (the model stopped at once) has no tokens to score
    share = (s_chosen - s_rejected) / score_range
    if share <= 0 or share < cfg.min_margin:
        return None
    longest = max(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in (chosen, rejected))
    if longest > cfg.max_step_tokens:
        return None
    return {
        "prompt": render_prompt(tokenizer, t["question"], previous), "chosen": chosen, "rejected": rejected,
        "problem_id": t["problem_id"], "question": t["question"], "previous_steps": list(previous),
        "chosen_score": s_chosen, "rejected_score": s_rejected, "margin": s_chosen - s_rejected,
        "margin_share": round(share, 4),
        "round": round_index, "method": t["method"], "kind": kind,
    }


def _srlm_pairs(t, tokenizer, cfg, round_index):
    scores = t["scores"]
    answered = t.get("sample_answered") or [True] * len(scores)
    # an unparseable reply is no score, not a 0; a sample without a final answer is never paired
    scored = [i for i, x in enumerate(scores) if x is not None and answered[i]]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda i: (scores[i], -i))
    worst = min(scored, key=lambda i: (scores[i], i))
    row = _pair_row(t, tokenizer, [], t["samples"][best], t["samples"][worst], scores[best], scores[worst],
                    SRLM_TOP_SCORE,
                    PairsConfig(cfg.min_margin, max_step_tokens=10**9, drop_identical=cfg.drop_identical),
                    round_index, kind="solution")
    if row:
        row.update(step_index=0, chosen_correct=t["sample_correct"][best], rejected_correct=t["sample_correct"][worst])
    return [row] if row else []


def pair_stats(traces: list[dict], pairs: list[dict]) -> dict:
    """Pairs per problem and per step index; where the truth is known, how often chosen is right
    and rejected is wrong; how the searches ended; how often the judge's two orders disagreed."""
    known = [p for p in pairs if p.get("chosen_correct") is not None and p.get("rejected_correct") is not None]
    events = [e for t in traces for e in t.get("events", [])]
    comparisons = sum(len(e["scores"]) * (len(e["scores"]) - 1) // 2 for e in events)
    stats = {
        "problems": len(traces),
        "pairs": len(pairs),
        "pairs_per_problem": round(len(pairs) / max(1, len(traces)), 3),
        "pairs_per_step_index": dict(sorted(Counter(p["step_index"] for p in pairs).items())),
        "status": dict(Counter(t["status"] for t in traces)),
        "final_accuracy": round(sum(t["final_correct"] for t in traces) / max(1, len(traces)), 4),
        "mean_steps_per_solution": round(sum(len(t.get("path", [])) for t in traces) / max(1, len(traces)), 3),
        "order_disagreement_rate": (round(sum(e["order_disagreements"] for e in events) / max(1, comparisons), 4)
                                    if events else None),
        "unparseable_verdicts": sum(e.get("unparseable", 0) for e in events) + sum(
            t.get("unparseable", 0) for t in traces if t.get("method") == "srlm"),
        "ties": sum(bool(e.get("tie")) for e in events),
        # SRLM: whole-solution samples without a final answer (not scored, not paired)
        "unanswered_samples": sum(t.get("unanswered", 0) for t in traces if t.get("method") == "srlm"),
        "tie_rate": round(sum(bool(e.get("tie")) for e in events) / len(events), 4) if events else None,
        # kept steps without a pair: filtered out (identical, empty, over max_step_tokens, below min_margin)
        # or, for the oracle, every candidate right
        "kept_steps_without_pair": sum(bool(e.get("kept")) for e in events)
        - sum(p.get("kind") == "step" and not p.get("rolled_back") for p in pairs),
        "pairs_from_rolled_back_steps": sum(bool(p.get("rolled_back")) for p in pairs),
    }
    if (endings := ending_pairs(pairs)) is not None:
        stats["endings"] = endings
    if (in_search := judge_in_search(traces)) is not None:
        stats["judge_in_search"] = in_search
    if known:
        stats["truth"] = {
            "pairs_with_truth": len(known),
            "chosen_right": round(sum(p["chosen_correct"] for p in known) / len(known), 4),
            "rejected_wrong": round(sum(not p["rejected_correct"] for p in known) / len(known), 4),
            "chosen_right_and_rejected_wrong": round(
                sum(p["chosen_correct"] and not p["rejected_correct"] for p in known) / len(known), 4),
            "mix": truth_mix(known),
        }
    return stats


def truth_mix(pairs: list[dict]) -> dict:
    """Pairs by the task's truth of both sides: right over wrong is what a perfect judge makes; wrong over wrong
    (a step where no candidate is right, which no judge without the truth can see) and wrong over right teach
    the model a wrong step."""
    known = [p for p in pairs if p.get("chosen_correct") is not None and p.get("rejected_correct") is not None]
    word = {True: "right", False: "wrong"}
    mix = {f"{a}_over_{b}": 0 for a in ("right", "wrong") for b in ("wrong", "right")}
    for p in known:
        mix[f"{word[bool(p['chosen_correct'])]}_over_{word[bool(p['rejected_correct'])]}"] += 1
    return mix


def ending_pairs(pairs: list[dict]) -> dict | None:
    """Step pairs where exactly one side gives the final answer: which way the judge leaned. A judge that
    prefers going on over answering teaches the model never to stop (truth-free, so it holds for any task)."""
    step = [p for p in pairs if p.get("kind") == "step"]
    if not step:
        return None
    go_on = sum(has_final_answer(p["rejected"]) and not has_final_answer(p["chosen"]) for p in step)
    stop = sum(has_final_answer(p["chosen"]) and not has_final_answer(p["rejected"]) for p in step)
    return {"step_pairs": len(step), "chosen_goes_on_rejected_answers": go_on, "chosen_answers_rejected_goes_on": stop}


def judge_in_search(traces: list[dict]) -> dict | None:
    """The judge on the model's own candidates (task truth, step search only): how often no candidate
    was right, and at steps where some are right and some wrong, how often the kept one is right,
    against a random pick. A tie (nothing kept, roll back) counts as a step judged, not kept right.
    A candidate the task cannot check (``None``: prose without an equation) counts as not right."""
    steps = [e for t in traces for e in t.get("events", []) if e.get("candidate_correct")]
    if not steps:
        return None
    right = [[c is True for c in e["candidate_correct"]] for e in steps]
    mixed = [(e, r) for e, r in zip(steps, right) if any(r) and not all(r)]
    kept_right = sum(e.get("best") is not None and r[e["best"]] for e, r in mixed)
    cands = [c for e in steps for c in e["candidate_correct"]]
    return {
        "steps": len(steps),
        "no_right_candidate": round(sum(not any(r) for r in right) / len(steps), 4),
        "unverifiable_candidates": round(sum(c is None for c in cands) / len(cands), 4),
        "ties": round(sum(e.get("best") is None for e in steps) / len(steps), 4),
        "mixed_steps": len(mixed),
        "kept_right_when_mixed": round(kept_right / len(mixed), 4) if mixed else None,
        "random_right_when_mixed": round(sum(sum(r) / len(r) for _, r in mixed) / len(mixed), 4) if mixed else None,
    }


def format_stats(stats: dict) -> str:
    lines = [f"problems {stats['problems']}, pairs {stats['pairs']} ({stats['pairs_per_problem']} per problem), "
             f"final accuracy {stats['final_accuracy']:.3f}, steps/solution {stats['mean_steps_per_solution']}",
             f"pairs per step index: {stats['pairs_per_step_index']}", f"search ended: {stats['status']}",
             f"judge order disagreement: {stats['order_disagreement_rate']}, unparseable verdicts: "
             f"{stats['unparseable_verdicts']}, ties: {stats['ties']} ({stats.get('tie_rate')} of steps), "
             f"kept steps filtered out: {stats['kept_steps_without_pair']}, "
             f"pairs from rolled-back steps: {stats.get('pairs_from_rolled_back_steps', 0)}"]
    if "truth" in stats:
        t = stats["truth"]
        lines.append(f"truth ({t['pairs_with_truth']} pairs): chosen right {t['chosen_right']:.3f}, rejected wrong "
                     f"{t['rejected_wrong']:.3f}, both {t['chosen_right_and_rejected_wrong']:.3f}")
    return "\n".join(lines)
