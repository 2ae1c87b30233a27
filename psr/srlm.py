"""The baseline users compare against: outcome-based Self-Rewarding (SRLM, Yuan et al. 2024).

Sample k whole solutions per problem, score each with the model as a pointwise LLM-as-a-Judge
(the additive 5-point rubric, ``Score: N``), and pair the best with the worst whole solution.
Same files and formats as the PSR search (``search.jsonl`` traces, ``pairs.jsonl`` rows with
``kind: solution``).
"""

from __future__ import annotations

import re

import torch

from psr.answers import final_answer
from psr.generation import generate
from psr.judge import token_probs
from psr.steps import render_prompt, split_steps

SRLM_PROMPT = (
    "Review the user's math question and the response below using the additive 5-point scoring system. "
    "Points accumulate for each criterion met:\n"
    "- Add 1 point if the response is relevant and makes some progress on the question.\n"
    "- Add another point if it addresses a substantial part of the problem with correct reasoning.\n"
    "- Award a third point if its steps are correct and reach a final answer.\n"
    "- Grant a fourth point if every step is correct, clearly written and well organised.\n"
    "- Bestow a fifth point if the solution is correct, complete, concise and without any error.\n\n"
    "Question: {question}\n\n<response>{response}</response>\n\n"
    "After examining the question and the response, briefly justify your total score, then conclude with "
    "\"Score: <total points>\"."
)
_SCORE_RE = re.compile(r"Score:\s*([0-5])")


def parse_score(text: str) -> int | None:
    found = _SCORE_RE.findall(text)
    return int(found[-1]) if found else None


class RubricJudge:
    """Pointwise 0–5 scores: expected score from P("0".."5") after ``Score:`` (logits) or parsed replies."""

    def __init__(self, model, tokenizer, mode: str = "logits", max_new_tokens: int = 128, batch_size: int = 16):
        self.model, self.tok, self.mode = model, tokenizer, mode
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prefix, self.digit_ids = self._score_tokens()

    def _score_tokens(self):
        # Find a prefix after which each digit is one token of its own (tokenizers differ on the space).
        for prefix, sep in (("Score: ", ""), ("Score:", " ")):
            base = self.tok(prefix, add_special_tokens=False)["input_ids"]
            ids = [self.tok(prefix + sep + str(d), add_special_tokens=False)["input_ids"] for d in range(6)]
            if all(i[: len(base)] == base and len(i) == len(base) + 1 for i in ids):
                return prefix, [i[-1] for i in ids]
        raise ValueError("cannot find single-token score digits for this tokenizer; use judge_mode: generate")

    def _prompt(self, question: str, response: str, for_logits: bool) -> str:
        messages = [{"role": "user", "content": SRLM_PROMPT.format(question=question, response=response.strip())}]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + self.prefix if for_logits else text

    def fits(self, items: list[tuple[str, str]]) -> list[bool]:
        """Does each rubric prompt leave room for the reply (one token for logits, else max_new_tokens)?"""
        from psr.lengths import fits

        logits = self.mode != "generate"
        return fits(self.model, self.tok, [self._prompt(q, r, logits) for q, r in items],
                    1 if logits else self.max_new_tokens)

    @torch.no_grad()
    def score(self, items: list[tuple[str, str]]) -> tuple[list[float | None], int]:
        """Scores for (question, response) items (None: unparseable reply, or a rubric prompt that does not fit
        the context, psr.lengths) and how many were unparseable."""
        ok = self.fits(items)
        if not all(ok):
            scores, unparseable = self.score([it for it, k in zip(items, ok) if k]) if any(ok) else ([], 0)
            it = iter(scores)
            return [next(it) if k else None for k in ok], unparseable
        if self.mode == "generate":
            replies = generate(self.model, self.tok, [self._prompt(q, r, False) for q, r in items],
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=False)
            parsed = [parse_score(r[0]) for r in replies]
            # An unparseable reply has no score (None): it must not become the "worst" solution of a pair.
            return [float(s) if s is not None else None for s in parsed], sum(s is None for s in parsed)
        prompts = [self._prompt(q, r, True) for q, r in items]
        if getattr(self.model, "is_vllm_engine", False):
            probs = self.model.choice_probs(prompts, self.digit_ids)
            return (probs @ torch.arange(6.0)).tolist(), 0
        self.tok.padding_side = "left"
        scores = []
        for s in range(0, len(prompts), self.batch_size):
            batch = self.tok(prompts[s : s + self.batch_size], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.model.device)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hidden = self.model.get_decoder()(**batch, position_ids=positions).last_hidden_state[:, -1]
            probs = token_probs(self.model, hidden, self.digit_ids)  # float32, as the step judge reads its letters
            scores += (probs @ torch.arange(6.0, device=probs.device)).tolist()
        return scores, 0


def srlm_chunk(problems, task, model, tok, cfg) -> list[dict]:
    """Sample ``cfg.srlm.samples`` whole solutions per problem and score them with the rubric. A sample stops
    at the line of its answer; one without a final answer (cut off at ``max_new_tokens``) is counted, not
    scored, not paired: a cut-off text as a pair would teach the model to stop there. A question without room
    for a whole solution is not sampled, and a rubric prompt that does not fit gets no score (psr.lengths)."""
    from psr.lengths import fits

    k = cfg.srlm.samples
    prompts = [render_prompt(tok, p.question) for p in problems]
    ok = fits(model, tok, prompts, cfg.srlm.max_new_tokens)
    sampled = iter(generate(model, tok, [q for q, f in zip(prompts, ok) if f], cfg.sampling, cfg.srlm.max_new_tokens,
                            cfg.batch_size, num_samples=k, stop_at_answer=True, progress=False))
    samples = [next(sampled) if f else [""] * k for f in ok]
    answered = [[f and final_answer(s) is not None for s in ss] for ss, f in zip(samples, ok)]
    judge = RubricJudge(model, tok, cfg.srlm.judge_mode, cfg.srlm.judge_max_new_tokens, cfg.judge.batch_size)
    items = [(n, i) for n in range(len(problems)) for i in range(k) if answered[n][i]]
    pairs = [(problems[n].question, samples[n][i]) for n, i in items]
    judged, rubric_fits = (judge.score(pairs)[0], judge.fits(pairs)) if items else ([], [])
    scores = [[None] * k for _ in problems]
    unscored = [0] * len(problems)  # answered samples whose rubric prompt does not fit
    for (n, i), score, fit in zip(items, judged, rubric_fits):
        scores[n][i] = score
        unscored[n] += not fit
    traces = []
    for n, (p, ss) in enumerate(zip(problems, samples)):
        sc = scores[n]
        scored = [i for i in range(k) if sc[i] is not None] or list(range(k))
        best = max(scored, key=lambda i: (sc[i] if sc[i] is not None else -1, -i))
        correct = [task.check_answer(p, s) for s in ss]
        traces.append({
            "problem_id": p.id, "question": p.question, "gold": p.gold, "method": "srlm",
            "difficulty": task.difficulty(p), "status": "sampled" if ok[n] else "too_long", "rollbacks": 0,
            "path": split_steps(ss[best]), "final_answer": final_answer(ss[best]), "final_correct": correct[best],
            "samples": ss, "scores": sc, "sample_correct": correct, "sample_answered": answered[n],
            "unanswered": k - sum(answered[n]) if ok[n] else 0,
            "unparseable": sum(sc[i] is None for i in range(k) if answered[n][i]) - unscored[n],
            **({"too_long": unscored[n]} if unscored[n] else {}),
            "events": [],
        })
    return traces
