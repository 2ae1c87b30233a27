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


def extract_answer(text: str) -> str | None:
    """The model's final answer: last ``\\boxed{}``; else ``#### x``; else "the answer is x";
    else the last number in the text. None when nothing answer-like is there."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    m = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\s*(?:\$|\.\s|\.?$)", text, flags=re.I | re.M)
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
    """Extract the final answer from a model's solution and compare it with ``gold``."""
    return is_equivalent(gold, extract_answer(solution))
