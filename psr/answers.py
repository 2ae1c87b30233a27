"""Final-answer extraction and equivalence checking (math-verify, gold first)."""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces."""
    best = None
    for marker in ("\\boxed{", "\\fbox{"):
        i = text.rfind(marker)
        if i == -1 or (best is not None and i < best[0]):
            continue
        depth, j = 0, i + len(marker) - 1
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                best = (i, text[i + len(marker) : j])
                break
            j += 1
    return best[1].strip() if best else None


def gsm8k_gold(answer: str) -> str:
    """GSM8K reference answers end with ``#### <gold>``."""
    if "####" not in answer:
        raise ValueError("no '####' in GSM8K answer")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


# "The answer is 42", "the final answer is: $42$." -- the value up to the end of its sentence or line.
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*(?:\\?\$)?([^\n$]+?)\s*(?:\$|\.\s|\.?$)", flags=re.I | re.M)


def _boxed_at(text: str, i: int) -> str | None:
    """Content of the ``\\boxed{`` (or ``\\fbox{``) opening at ``i``, when its braces close."""
    start = text.index("{", i) + 1
    depth = 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j].strip()
    return None


def final_answer(text: str) -> str | None:
    """The first final answer ``text`` commits to -- a complete ``\\boxed{}``, ``#### x`` or "the answer is
    x", whichever comes first -- or None when it commits to none. This is psr's one grading rule (the
    lm-evaluation-harness calls the like ``strict-match``): a text cut off mid-step, a numbered list or
    a half-written solution has no final answer and is wrong, whatever numbers it holds."""
    found = []  # (position, answer)
    for marker in ("\\boxed{", "\\fbox{"):
        i = text.find(marker)
        while i != -1:
            boxed = _boxed_at(text, i)
            if boxed is not None:
                found.append((i, boxed))
                break
            i = text.find(marker, i + 1)
    for m in re.finditer(r"####[ \t]*([^\n]*)", text):
        if m.group(1).strip():
            found.append((m.start(), m.group(1).strip()))
            break
    # "the answer is the sum of 3 and 4" is no commitment: only a value (a number, or LaTeX) counts; "the answer
    # is \\boxed{..}" is the boxed answer, found above
    m = next((m for m in _ANSWER_IS_RE.finditer(text) if re.match(r"[-(]?[\d.\\]", m.group(1).strip())
              and "\\boxed" not in m.group(1) and "\\fbox" not in m.group(1)), None)
    if m:
        found.append((m.start(), m.group(1).strip()))
    return min(found)[1] if found else None


def extract_answer(text: str) -> str | None:
    """The answer psr grades: :func:`final_answer` (the first final answer; None when there is none)."""
    return final_answer(text)


def flexible_answer(text: str) -> str | None:
    """A lenient second reading, reported beside the strict one and never used to grade by default (the
    lm-evaluation-harness's ``flexible-extract``): the last ``\\boxed{}``; else ``#### x``; else the last
    "the answer is x"; else the last number in the text. It credits texts that never give an answer."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    m = _ANSWER_IS_RE.findall(text)
    if m:
        return m[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _parse(expr: str, in_main: bool):
    # math-verify's timeouts use signals, which only work on the main thread.
    expr = expr.replace("\\$", "").strip()  # currency signs: "\$18" means 18
    kwargs = {} if in_main else {"parsing_timeout": None}
    text = expr if "$" in expr or "\\boxed" in expr else f"${expr}$"
    parsed = parse(text, **kwargs)
    if not parsed:  # plain text like "1,000" or "5 dollars": let math-verify try it bare
        parsed = parse(expr, **kwargs)
    return parsed


def is_equivalent(gold: str, pred: str | None) -> bool:
    """True when ``pred`` means the same as ``gold`` (math-verify; gold first)."""
    if pred is None or not str(pred).strip():
        return False
    in_main = threading.current_thread() is threading.main_thread()
    gold_p, pred_p = _parse(str(gold), in_main), _parse(str(pred), in_main)
    if not gold_p or not pred_p:
        return str(gold).strip() == str(pred).strip()
    kwargs = {} if in_main else {"timeout_seconds": None}
    return bool(verify(gold_p, pred_p, **kwargs))


def is_correct(gold: str, solution: str) -> bool:
    """psr's one grading rule: the first final answer ``solution`` commits to (:func:`final_answer`) means
    the same as ``gold``. A solution without a final answer is wrong. Evaluation, maj@k/pass@k, the
    search's ``final_correct``, SRLM and the rollout annotator all grade with this."""
    return is_equivalent(gold, final_answer(solution))


def is_correct_flexible(gold: str, solution: str) -> bool:
    """The lenient reading (:func:`flexible_answer`): a second metric, never the default."""
    return is_equivalent(gold, flexible_answer(solution))


def majority_answer(answers: list[str | None]) -> str | None:
    """The most common answer, grouping answers that math-verify calls equivalent (None: no answer at all).
    maj@k's vote, and the consensus of a step's rollouts (psr.self_judges)."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if g[0] == a or is_equivalent(g[0], a):
                g.append(a)
                break
        else:
            groups.append([a])
    return max(groups, key=len)[0] if groups else None
