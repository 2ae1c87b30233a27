"""GSM8K- and MATH-style tasks from JSONL (fields ``question`` and ``answer``), from a local file
or a hub id, read with ``datasets``. GSM8K's gold follows ``####``; MATH's is the last ``\\boxed{}``.

Every row is checked: a missing field or an answer without a gold gives an error naming the file
and the line; nothing is skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from psr.answers import gsm8k_gold, last_boxed
from psr.files import DataError, iter_jsonl
from psr.steps import step_prefix
from psr.tasks.base import Problem, Task

__all__ = ["DataError", "JsonlMathTask", "check_text_field", "gsm8k_reference_steps", "read_rows"]


def _gold(kind: str, answer: str) -> str | None:
    if kind == "gsm8k":
        return gsm8k_gold(answer) if "####" in answer else None
    return last_boxed(answer)


def gsm8k_reference_steps(answer: str) -> list[str]:
    """GSM8K's reference solution as steps: one step per line, calculator annotations removed,
    the gold boxed in the last step."""
    body, gold = answer.rsplit("####", 1)
    lines = [re.sub(r"<<[^>]*>>", "", line).strip() for line in body.strip().splitlines() if line.strip()]
    steps = [step_prefix(i + 1) + line for i, line in enumerate(lines)]
    final = f"The answer is \\boxed{{{gold.strip().replace(',', '')}}}."
    if steps:
        steps[-1] += " " + final
    else:
        steps = [step_prefix(1) + final]
    return steps


def check_text_field(row: dict, fld: str, where: str, hint: str = "") -> None:
    """A required text field: missing, not a string (a number, a list, ...) or blank is a
    :class:`DataError` at ``where`` (``file:line``) that says which (``hint``: what rows need)."""
    if fld not in row:
        raise DataError(f"{where}: missing field '{fld}'" + (f" ({hint})" if hint else ""))
    if not isinstance(row[fld], str):
        raise DataError(f"{where}: field '{fld}' must be a string, got {type(row[fld]).__name__}")
    if not row[fld].strip():
        raise DataError(f"{where}: field '{fld}' is empty")


def is_hub_id(data: str) -> bool:
    """``org/name``, ``org/name:split`` or ``org/name:config:split`` (not a path)."""
    return re.match(r"^[\w.-]+/[\w.-]+(:[\w.-]+){0,2}$", data) is not None and not data.endswith((".jsonl", ".json"))


def final_answer_text(value, where: str, fld: str) -> str:
    """A final-answer field as text: a string, a number (AIME's 204), or a list of one (OlympiadBench's
    ``["$\\frac{1}{2}$"]``); the math delimiters ``$...$`` around it are dropped."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field '{fld}' must be a final answer (text, a number or a list of one), got "
                        f"{type(value).__name__}")
    text = str(value).strip().strip("$").strip()
    if not text:
        raise DataError(f"{where}: field '{fld}' is empty")
    return text


def read_rows(data: str, subset: str | None = None) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a local JSONL file (:func:`psr.files.iter_jsonl`), or rows of
    a hub dataset via ``datasets``; no rows at all is an error."""
    path = Path(data).expanduser()
    if path.exists():
        rows = list(iter_jsonl(path))
        if not rows:
            raise DataError(f"{path}: no rows")
        return rows
    if data.startswith(("/", "./", "../", "~")) or data.endswith((".jsonl", ".json")):
        raise DataError(f"data file {data} does not exist")
    # A hub dataset id, optionally "id:split" (e.g. openai/gsm8k:test) or "id:config:split" (psr's hub block
    # pushes a run's pairs as config pairs, one split per round); needs the network.
    from datasets import load_dataset

    name, _, split = data.partition(":")
    config, _, split = split.rpartition(":") if split.count(":") == 1 else (None, "", split)
    config = subset or config or ("main" if name.endswith("gsm8k") else None)
    try:
        ds = load_dataset(name, config, split=split or "test")
    except Exception as err:  # datasets raises many kinds here; the user needs the id and the cause
        raise DataError(f"could not load dataset {data!r} (a local path or a hub id): {err}") from err
    return [(i + 1, row) for i, row in enumerate(ds)]


@dataclass
class JsonlMathTask(Task):
    kind: str = "gsm8k"  # or "math"
    data: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "solution"  # or "final": answer_field holds the final answer itself (TaskConfig)
    subset: str | None = None

    def __post_init__(self):
        self.name = self.kind
        if not self.data:
            raise DataError(f"task {self.kind} needs data: a JSONL path (fields question/answer) or a hub id")
        self._cache: list[Problem] | None = None

    def all_problems(self) -> list[Problem]:
        if self._cache is None:
            problems = []
            final = self.answer_format == "final"
            for lineno, row in read_rows(self.data, self.subset):
                where = f"{self.data}:{lineno}"
                check_text_field(row, self.question_field, where)
                if final:
                    if self.answer_field not in row:
                        raise DataError(f"{where}: missing field '{self.answer_field}'")
                    answer = gold = final_answer_text(row[self.answer_field], where, self.answer_field)
                else:
                    check_text_field(row, self.answer_field, where)
                    answer = row[self.answer_field]
                    gold = _gold(self.kind, answer)
                if not gold:
                    want = "'#### <answer>'" if self.kind == "gsm8k" else "a \\boxed{} answer"
                    raise DataError(f"{self.data}:{lineno}: field '{self.answer_field}' has no gold ({want})")
                steps = gsm8k_reference_steps(answer) if self.kind == "gsm8k" and not final else None
                problems.append(Problem(id=f"{self.kind}-{lineno:05d}", question=row[self.question_field].strip(),
                                        gold=gold, reference_steps=steps, meta={"line": lineno}))
            self._cache = problems
        return self._cache

    def problems(self, split: str = "test", limit: int | None = None, seed: int = 0, offset: int = 0) -> list[Problem]:
        """Rows in file order (the split is the file itself); ``offset`` skips rows used elsewhere.
        No problem at all (``offset`` at or past the end, ``limit`` 0) is an error naming the numbers."""
        if offset < 0 or (limit is not None and limit < 1):
            raise DataError(f"{self.data}: need offset >= 0 and limit >= 1 (or null), got offset {offset}, "
                            f"limit {limit}")
        everything = self.all_problems()
        if offset >= len(everything):
            raise DataError(f"no problems: offset {offset} is past the end of {self.data} ({len(everything)} rows)")
        rows = everything[offset:]
        return rows[:limit] if limit is not None else rows
