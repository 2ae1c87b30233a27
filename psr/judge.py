"""The step-wise pairwise judge: which of two candidate next steps is better?

One prompt template (overridable from config). The judge's reply ends with the verdict
``Verdict: [[A]]`` or ``Verdict: [[B]]``, optionally preceded by a short justification. EFT data
(``psr init``) is written in exactly this reply format, so that:
- ``generate`` mode lets the model write (justification +) verdict and parses it;
- ``logits`` mode ends the prompt at ``Verdict: [[`` and compares P("A") with P("B").
"""

from __future__ import annotations

import re

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
