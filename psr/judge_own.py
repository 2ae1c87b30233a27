"""The judge on the model's *own* candidate steps: the measure that says whether PSR's pairs carry signal.

Held-out accuracy on synthetic pairs (right step vs a corruption) did not transfer to the model's own
mistakes. This samples ``width`` candidate next steps from the model after every right prefix of a
held-out problem's reference solution, labels each with the task's exact step check, and at the
*mixed* steps (some candidates right, some not) asks how often the judge's best candidate is right,
against a random pick among the same candidates.

    steps = own_candidates(model, tok, task, problems, width=4)       # sample + label once
    summary = score_own(StepJudge(model, tok, cfg), steps)            # any judge, same candidates
"""

from __future__ import annotations

import math
import re

import torch

from psr.generation import generate
from psr.judge import summed_strength
from psr.sampling import SamplingConfig
from psr.steps import render_prompt


def own_candidates(model, tok, task, problems, width: int = 4, sampling: SamplingConfig | None = None,
                   max_step_tokens: int = 48, batch_size: int = 48, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (problem, right prefix): the candidates the model proposes next and their truth
    (``True``/``False``/``None`` when the task cannot check a step)."""
    sampling = sampling or SamplingConfig(policy="edt")
    items = [(p, p.reference_steps[:k]) for p in problems for k in range(len(p.reference_steps))]
    torch.manual_seed(seed)
    prompts = [render_prompt(tok, p.question, prefix) for p, prefix in items]
    cands = generate(model, tok, prompts, sampling, max_step_tokens, batch_size, num_samples=width,
                     stop_at_step=True, desc="own candidates", progress=progress)
    return [{"problem_id": p.id, "question": p.question, "previous_steps": list(prefix), "candidates": c,
             "candidate_correct": [task.check_step(p, prefix, x) for x in c]} for (p, prefix), c in zip(items, cands)]


def mixed_steps(steps: list[dict]) -> list[dict]:
    """Steps where at least one candidate is right and at least one is not (unverifiable = not right)."""
    return [s for s in steps if any(c is True for c in s["candidate_correct"])
            and not all(c is True for c in s["candidate_correct"])]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 4), round(centre + half, 4))


def summed_scores(comp, n: int, margin: float) -> list[int]:
    """Wins per candidate from a logits-mode comparison's P(A) values under another tie margin: the same
    judge calls, re-read (margin 0 shows which way the judge leans where the default margin ties)."""
    wins = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            strength = summed_strength(comp.order_scores[f"{i},{j}"], comp.order_scores[f"{j},{i}"])
            if strength > margin:
                wins[i] += 1
            elif strength < -margin:
                wins[j] += 1
    return wins


def score_own(judge, steps: list[dict], margins: tuple[float, ...] = (), likelihood: bool = False,
              policy=None) -> dict:
    """Kept-right share of ``judge`` (an object with ``compare``) at the mixed steps, vs a random pick.
    A step whose scores are all equal (the search would roll back) counts as not kept right.
    ``margins``: also report the same calls re-read under these tie margins (logits mode only).
    ``likelihood``: also ask whether the judge just follows the generator (``likelihood_view``), scoring the
    candidates with ``policy`` (an HF model; default: the judge's own model)."""
    mixed = mixed_steps(steps)
    comps = judge.compare([(s["question"], s["previous_steps"], s["candidates"]) for s in mixed]) if mixed else []
    out = _kept_right(mixed, [c.scores for c in comps], len(steps))
    replies = sum(len(c.replies) for c in comps)
    if replies:  # generate mode: how often it gave no verdict, and what it wrote (reasoning judges)
        out["unparseable"] = round(sum(c.unparseable for c in comps) / replies, 4)
        keep = ("problem_id", "question", "previous_steps", "candidates", "candidate_correct")
        out["replies"] = [{**{k: s.get(k) for k in keep}, "replies": c.replies} for s, c in zip(mixed, comps)]
    if margins:
        out["by_margin"] = {str(m): _kept_right(mixed, [summed_scores(c, len(s["candidates"]), m)
                                                        for s, c in zip(mixed, comps)], len(steps))
                            for m in margins}
    if likelihood and mixed:
        out["likelihood"] = likelihood_view(mixed, comps, candidate_loglik(policy or judge.model, judge.tok, mixed))
    return out


def reduce_logprobs(logprobs: list[float], reduction: str = "mean") -> float:
    """One candidate's score from its tokens' log-probabilities: their mean, or their min (the least likely
    token). An empty candidate scores 0 (callers give it probability 0 themselves)."""
    if not logprobs:
        return 0.0
    return min(logprobs) if reduction == "min" else sum(logprobs) / len(logprobs)


@torch.no_grad()
def candidate_loglik(model, tok, steps: list[dict], reduction: str = "mean") -> list[list[float]]:
    """Log-probability of each candidate given its prompt, under ``model`` as the policy, reduced over its
    tokens by ``reduction`` (mean per token, or min). One forward per step: its candidates right-padded in one
    batch (padding after a row changes nothing before it under causal attention)."""
    if getattr(model, "is_vllm_engine", False):
        return _candidate_loglik_vllm(model, tok, steps, reduction)
    out = []
    for s in steps:
        head_ids, tails = _head_and_tails(tok, s)
        width = len(head_ids) + max(len(t) for t in tails)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        rows = [head_ids + t + [pad] * (width - len(head_ids) - len(t)) for t in tails]
        mask = [[1] * (len(head_ids) + len(t)) + [0] * (width - len(head_ids) - len(t)) for t in tails]
        ids = torch.tensor(rows, device=model.device)
        logits = model(input_ids=ids, attention_mask=torch.tensor(mask, device=model.device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        start = len(head_ids) - 1  # the first tail token is predicted at the last head position
        out.append([reduce_logprobs(logp[i, start:start + len(t)].tolist(), reduction) for i, t in enumerate(tails)])
    return out


def _head_and_tails(tok, s: dict) -> tuple[list[int], list[list[int]]]:
    """A step's prompt ids and each candidate's ids after it (the candidate as the chat template renders it)."""
    head = render_prompt(tok, s["question"], s["previous_steps"])
    tails = [tok(render_prompt(tok, s["question"], s["previous_steps"] + [c])[len(head):],
                 add_special_tokens=False)["input_ids"] for c in s["candidates"]]
    return tok(head, add_special_tokens=False)["input_ids"], tails


def _candidate_loglik_vllm(engine, tok, steps: list[dict], reduction: str = "mean") -> list[list[float]]:
    """``candidate_loglik`` on a vLLM engine: every (prompt + candidate) row's prompt log-probabilities in one
    batch. A row longer than the context scores -inf (probability 0: never kept over one that fits)."""
    rows, where = [], []
    for n, s in enumerate(steps):
        head_ids, tails = _head_and_tails(tok, s)
        for t in tails:
            where.append((n, len(head_ids), len(t)))
            rows.append(head_ids + t)
    logps = engine.token_logprobs(rows)
    out = [[] for _ in steps]
    for (n, start, length), lp in zip(where, logps):
        if not length:
            out[n].append(0.0)
        else:
            out[n].append(float("-inf") if lp is None else reduce_logprobs(lp[start : start + length], reduction))
    return out


_LINE_VERDICT = re.compile(r",\s*(right|wrong)\b")


def reasoning_lines(task, by_id: dict, replies: list[dict]) -> dict:
    """How right a reasoning judge's lines are (the ``recompute`` format: "Next step: ..." then "A: ..., right."
    / "A: ..., wrong..."): the share of replies whose next-step line is the task's, and of candidate lines whose
    right/wrong is the truth. The verdict can only be as good as these."""
    next_ok = next_n = line_ok = line_n = 0
    for r in replies:
        problem = by_id[r["problem_id"]]
        want = task.recompute(problem, r["previous_steps"], {}).split("\n")[0]
        for key, text in r["replies"].items():
            i, j = map(int, key.split(","))
            lines = text.split("\n")
            next_n += 1
            next_ok += bool(lines) and lines[0].strip() == want
            for label, c in (("A", i), ("B", j)):
                said = next((x for x in lines if x.startswith(f"{label}: ")), None)
                truth = r["candidate_correct"][c] is True
                line_n += 1
                verdict = _LINE_VERDICT.search(said or "")
                line_ok += verdict is not None and (verdict.group(1) == "right") == truth
    return {"next_step_right": round(next_ok / next_n, 4) if next_n else None, "replies": next_n,
            "candidate_lines_right": round(line_ok / line_n, 4) if line_n else None, "candidate_lines": line_n}


def likelihood_view(mixed: list[dict], comps, lls: list[list[float]]) -> dict:
    """Does the judge prefer what the policy finds likely? Over candidate pairs at the mixed steps (distinct
    texts): how often the judge's lean (summed P(A), margin 0) sides with the likelier candidate, and that
    for right-vs-wrong pairs only; and the kept-right share of a judge that just picks the likeliest."""
    agree, pairs, agree_rw, pairs_rw = 0, 0, 0, 0
    picks = []
    for s, c, ll in zip(mixed, comps, lls):
        n = len(s["candidates"])
        for i in range(n):
            for j in range(i + 1, n):
                if s["candidates"][i] == s["candidates"][j] or ll[i] == ll[j]:
                    continue
                lean = summed_strength(c.order_scores[f"{i},{j}"], c.order_scores[f"{j},{i}"])
                if lean == 0:
                    continue
                same = (lean > 0) == (ll[i] > ll[j])
                agree, pairs = agree + same, pairs + 1
                if (s["candidate_correct"][i] is True) != (s["candidate_correct"][j] is True):
                    agree_rw, pairs_rw = agree_rw + same, pairs_rw + 1
        best = max(range(n), key=lambda i: ll[i])
        picks.append([int(i == best) for i in range(n)])
    likeliest = _kept_right(mixed, picks, len(mixed))
    return {"judge_sides_with_likelier": round(agree / pairs, 4) if pairs else None, "pairs": pairs,
            "judge_sides_with_likelier_right_vs_wrong": round(agree_rw / pairs_rw, 4) if pairs_rw else None,
            "pairs_right_vs_wrong": pairs_rw,
            "likeliest_kept_right": likeliest["kept_right"],
            "likeliest_kept_right_interval": likeliest["kept_right_interval"]}


def _kept_right(mixed: list[dict], scores: list[list[int]], n_steps: int) -> dict:
    kept, ties, diffs = 0, 0, []
    for s, sc in zip(mixed, scores):
        right = [c is True for c in s["candidate_correct"]]
        random_share = sum(right) / len(right)
        if max(sc) == min(sc):
            ties += 1
            hit = 0
        else:
            hit = int(right[max(range(len(right)), key=lambda i: (sc[i], -i))])
        kept += hit
        diffs.append(hit - random_share)
    n = len(mixed)
    random_right = sum(sum(c is True for c in s["candidate_correct"]) / len(s["candidate_correct"]) for s in mixed)
    mean = sum(diffs) / n if n else 0.0
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    return {
        "steps": n_steps, "mixed_steps": n,
        "kept_right": round(kept / n, 4) if n else None, "kept_right_interval": wilson(kept, n),
        "random_right": round(random_right / n, 4) if n else None,
        # paired per step: kept (0/1) minus the random pick's chance; z >= 2 means better than random
        "gain_over_random": round(mean, 4), "gain_z": round(mean / (sd / math.sqrt(n)), 2) if n > 1 and sd else None,
        "ties": round(ties / n, 4) if n else None,
    }
