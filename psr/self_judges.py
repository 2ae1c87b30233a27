"""Self-judges beyond the paper: the model scores its own candidate steps without asking itself a judge
question and without any ground truth. They answer the same ``compare`` call as the LLM judge
(:class:`psr.judge.StepJudge`), so the search, its tie rule, the pairs and every measure stay the same.

- ``consistency`` (self-consistency, Wang et al. 2022, applied per step): ``consistency_rollouts``
  completions from each candidate, each stopped at its answer line; the answer most of the step's
  rollouts reach is the step's consensus, and a candidate's score is the share of its own rollouts that
  reach it. A candidate that already gives the answer scores 1 when that answer is the consensus.
- ``likelihood``: the policy's per-token probability of the candidate (geometric mean), or with
  ``likelihood_reduction: min`` the probability of its least likely token; on HF or vLLM.

Candidate i beats j when ``score_i - score_j`` exceeds ``judge.tie_margin`` (both scores in [0, 1], so
the margin means the same in both modes); equal scores tie and the search rolls back, as with the LLM
judge. ``order_scores["i,j"]`` holds ``0.5 + (score_i - score_j) / 2``, the analogue of P(i better).

Neither is the paper's judge (psr.judge, modes logits/generate) nor uses the task's truth (mode truth).
"""

from __future__ import annotations

import math

from psr.answers import final_answer, is_equivalent, majority_answer
from psr.judge import Comparison, JudgeConfig, StepJudge
from psr.sampling import SamplingConfig
from psr.steps import has_final_answer, render_prompt


def score_comparison(scores: list[float], tie_margin: float) -> Comparison:
    """Pairwise wins from per-candidate scores in [0, 1]."""
    n = len(scores)
    wins = [[int(scores[i] - scores[j] > tie_margin) for j in range(n)] for i in range(n)]
    order_scores = {f"{i},{j}": 0.5 + (scores[i] - scores[j]) / 2 for i in range(n) for j in range(n) if i != j}
    return Comparison(order_scores, wins, [sum(r) for r in wins], disagreements=0)


def consensus(answers: list[str | None]) -> str | None:
    """The answer most of ``answers`` reach (math-verify equivalence groups them); None when none answers."""
    return majority_answer(answers)


def consistency_scores(candidates: list[str], rollouts: list[list[str] | None]) -> tuple[list[float], str | None]:
    """Each candidate's share of rollouts reaching the step's consensus answer. ``rollouts[i]`` is None for a
    candidate that gives the answer itself (it counts as that answer, as many times as the others roll out)."""
    k = max((len(r) for r in rollouts if r is not None), default=1)
    answers = []
    for cand, outs in zip(candidates, rollouts):
        if outs is None:
            answers.append([final_answer(cand)] * k)
        else:
            answers.append([final_answer(cand.rstrip() + "\n" + o) for o in outs])
    top = consensus([a for row in answers for a in row])
    if top is None:
        return [0.0] * len(candidates), None
    return [sum(a is not None and (a == top or is_equivalent(top, a)) for a in row) / max(1, len(row))
            for row in answers], top


class ConsistencyJudge:
    """Self-consistency of each candidate's rollouts (see the module doc)."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tok, self.cfg = model, tokenizer, cfg

    def compare(self, items: list[tuple[str, list[str], list[str]]]) -> list[Comparison]:
        from psr.generation import generate

        jobs = [(n, i) for n, (_, _, cands) in enumerate(items) for i, c in enumerate(cands)
                if c.strip() and not has_final_answer(c)]
        prompts = [render_prompt(self.tok, items[n][0], list(items[n][1]) + [items[n][2][i]]) for n, i in jobs]
        outs = generate(self.model, self.tok, prompts,
                        SamplingConfig(policy="fixed", temperature=self.cfg.consistency_temperature),
                        self.cfg.consistency_max_new_tokens, self.cfg.batch_size,
                        num_samples=self.cfg.consistency_rollouts, stop_at_answer=True, progress=False) if jobs else []
        rollouts = [[None if has_final_answer(c) else [] for c in cands] for _, _, cands in items]
        for (n, i), o in zip(jobs, outs):
            rollouts[n][i] = o
        comps = []
        for (_, _, cands), rows in zip(items, rollouts):
            scores, top = consistency_scores(cands, rows)
            comp = score_comparison(scores, self.cfg.tie_margin)
            comp.consistency = {"consensus": top, "shares": scores}
            comps.append(comp)
        return comps


class LikelihoodJudge:
    """The policy's per-token probability of each candidate (geometric mean, or its least likely token): one
    forward per step on HF, the prompt log-probabilities of every candidate in one batch on vLLM."""

    def __init__(self, model, tokenizer, cfg):
        self.model, self.tok, self.cfg = model, tokenizer, cfg

    def compare(self, items: list[tuple[str, list[str], list[str]]]) -> list[Comparison]:
        import torch

        from psr.judge_own import candidate_loglik

        steps = [{"question": q, "previous_steps": list(prev), "candidates": cands} for q, prev, cands in items]
        with torch.no_grad():
            lls = candidate_loglik(self.model, self.tok, steps, self.cfg.likelihood_reduction)
        return [likelihood_comparison(ll, s["candidates"], self.cfg.tie_margin) for ll, s in zip(lls, steps)]


def likelihood_comparison(lls: list[float], candidates: list[str], tie_margin: float) -> Comparison:
    """Wins from each candidate's reduced log-probability (``candidate_loglik``; an empty candidate scores 0);
    the in-flight search reads the same values from its own requests."""
    return score_comparison([math.exp(x) if c.strip() else 0.0 for x, c in zip(lls, candidates)], tie_margin)


def make_judge(model, tokenizer, cfg: JudgeConfig):
    """The judge of ``cfg.mode``: :class:`psr.judge.StepJudge` (logits, generate: the paper's), a self-judge of
    this module (consistency, likelihood), or None for truth (the caller checks steps with the task)."""
    if cfg.mode == "truth":
        return None
    if cfg.mode == "consistency":
        return ConsistencyJudge(model, tokenizer, cfg)
    if cfg.mode == "likelihood":
        return LikelihoodJudge(model, tokenizer, cfg)
    return StepJudge(model, tokenizer, cfg)
