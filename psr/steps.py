"""The step format and the reasoning prompt: the one place both are defined.

A solution is a sequence of lines, each starting with ``Step n: ``; the final answer sits in
``\\boxed{}`` inside the last step. Prompts are rendered with the model's chat template with the
assistant turn left open, followed by the steps written so far, each ending with a newline, so
that a prompt always ends on a token boundary right before the next ``Step n:`` marker.
"""

from __future__ import annotations

import re

REASONING_PROMPT = (
    "Solve the following math problem step by step. Start every step with \"Step n: \" "
    "(Step 1: , Step 2: , ...), one step per line, and put the final answer in \\boxed{{}} "
    "in the last step.\n\nProblem: {question}"
)

STEP_MARKER_RE = re.compile(r"(?m)^Step\s+(\d+)\s*:\s*")


def step_prefix(n: int) -> str:
    """The marker that opens step ``n`` (1-based)."""
    return f"Step {n}: "


def format_solution(steps: list[str]) -> str:
    """Join already-prefixed steps into a solution text (one step per line)."""
    return "".join(step.rstrip("\n") + "\n" for step in steps)


def split_steps(solution: str) -> list[str]:
    """Split a solution into its steps, each keeping its ``Step n:`` marker.

    Text before the first marker (if any) is dropped; a solution with no marker at all is
    returned as a single step so that nothing the model wrote is lost.
    """
    starts = [m.start() for m in STEP_MARKER_RE.finditer(solution)]
    if not starts:
        return [solution.strip()] if solution.strip() else []
    bounds = starts + [len(solution)]
    return [solution[a:b].strip() for a, b in zip(bounds, bounds[1:]) if solution[a:b].strip()]


def final_answer_end(text: str) -> int | None:
    """Index just after the first complete ``\\boxed{...}`` (balanced braces), or None."""
    i = text.find("\\boxed{")
    while i != -1:
        depth, j = 0, i + len("\\boxed")
        while j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return j + 1
            j += 1
        i = text.find("\\boxed{", i + 1)
    return None


def has_final_answer(text: str) -> bool:
    """True when ``text`` holds a complete ``\\boxed{...}`` (balanced braces)."""
    return final_answer_end(text) is not None


def answer_line_end(text: str) -> int | None:
    """Index of the newline that ends the line of the first complete ``\\boxed{}``; None until the
    answer is complete and its line has ended. Where a solution (or its final step) stops."""
    end = final_answer_end(text)
    if end is None:
        return None
    newline = text.find("\n", end)
    return None if newline == -1 else newline


def question_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": REASONING_PROMPT.format(question=question)}]


def render_prompt(tokenizer, question: str, previous_steps: list[str] | tuple = ()) -> str:
    """Chat-templated question with the assistant turn open, then the steps so far."""
    head = tokenizer.apply_chat_template(
        question_messages(question), tokenize=False, add_generation_prompt=True
    )
    return head + format_solution(list(previous_steps))
