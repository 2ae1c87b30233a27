"""``psr build-ift``: IFT data by step segmentation (the paper: "we get IFT data by step segmentation").

Reference solutions cut into the project's step format, one ``{"question", "steps", "answer"}`` row per
problem, the final answer boxed in the last step:
- GSM8K: one line a step, the calculator annotations ``<<...>>`` removed, the gold after ``####``;
- MATH: paragraphs, long ones cut into sentences (never inside ``$...$``), the ``\\boxed{}`` answer last;
- the built-in arithmetic task: its exact reference steps.
Rows that cannot be segmented are skipped and counted by reason (never dropped in silence).
``psr init --ift-data OUT`` trains on the file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from psr.answers import last_boxed
from psr.files import write_json_atomic, write_jsonl_atomic
from psr.steps import step_prefix
from psr.tasks import DataError, TaskConfig, make_task
from psr.tasks.jsonl import gsm8k_reference_steps, read_rows


@dataclass
class BuildIFTConfig:
    task: TaskConfig = field(default_factory=TaskConfig)  # arithmetic, or gsm8k/math with task.data (path or hub id)
    # rows (problems) to read, from offset: the range [offset, offset + limit) of the file, whatever is skipped
    # in it (so the next stage can start at next_offset, see the stats); null = all (arithmetic: 400)
    limit: int | None = None
    offset: int = 0  # skip this many rows (arithmetic: problems of its stream) first: keep other stages' rows out
    split: str = "train"  # arithmetic only
    seed: int = 0  # arithmetic only
    max_steps: int = 20  # a solution cut into more steps is skipped (counted)
    max_step_chars: int = 600  # a step longer than this after cutting is skipped (counted)
    out: str = "data/ift.jsonl"

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for all rows), got {self.limit}")
        if self.offset < 0 or self.max_steps < 1 or self.max_step_chars < 10:
            raise ValueError("offset must be >= 0, max_steps >= 1, max_step_chars >= 10")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\\$(])")


def _sentences(paragraph: str) -> list[str]:
    """Cut a paragraph at sentence ends that are outside ``$...$`` math."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        if paragraph[: m.start()].count("$") % 2 == 0:  # not inside inline math
            pieces.append(paragraph[start : m.start()])
            start = m.end()
    pieces.append(paragraph[start:])
    return [p.strip() for p in pieces if p.strip()]


def math_reference_steps(solution: str, long_paragraph: int = 300) -> list[str]:
    """A MATH solution as steps: one per paragraph, paragraphs over ``long_paragraph`` characters cut
    into sentences, fragments under 25 characters joined to the step before, each step on one line,
    and the boxed answer in the last step."""
    solution = re.sub(r"\[asy\].*?\[/asy\]", "", solution, flags=re.S)  # figures' code is no step
    # a copy's trailing echo of the answer ("...\\boxed{9}.The answer is: 9")
    solution = re.sub(r"(\\boxed\{.*\}[^\n]*?)\s*The answer is:.*$", r"\1", solution, flags=re.S)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", solution.strip()) if p.strip()]
    parts = []
    for p in paragraphs:
        parts += _sentences(p) if len(p) > long_paragraph and "$$" not in p else [p]
    steps = []
    for part in parts:
        if steps and len(part) < 25:
            steps[-1] += " " + part
        else:
            steps.append(part)
    gold = last_boxed(solution)
    if gold is not None and steps and "\\boxed{" not in steps[-1]:
        steps.append(f"The answer is \\boxed{{{gold}}}.")
    return [step_prefix(i + 1) + s for i, s in enumerate(steps)]


def _field_problem(row: dict, name: str) -> str | None:
    """Why ``row[name]`` is no usable text, as eval says it (missing, its type, empty), or None."""
    if name not in row:
        return f"missing field '{name}'"
    if not isinstance(row[name], str):
        return f"field '{name}' must be a string, got {type(row[name]).__name__}"
    return None if row[name].strip() else f"field '{name}' is empty"


def ift_rows(cfg: BuildIFTConfig, lines: dict | None = None) -> tuple[list[dict], Counter, int]:
    """(rows, skipped reasons, the first row not read) for the configured task; ``lines`` (when given) gets
    the first line numbers of each reason."""
    skipped: Counter = Counter()
    lines = {} if lines is None else lines

    def skip(reason: str, lineno: int) -> None:
        skipped[reason] += 1
        if len(lines.setdefault(reason, [])) < 5:
            lines[reason].append(lineno)
    rows = []
    if cfg.task.name == "arithmetic":
        task = make_task(cfg.task)
        for p in task.problems(cfg.split, cfg.limit or 400, seed=cfg.seed, offset=cfg.offset):
            rows.append({"question": p.question, "steps": p.reference_steps, "answer": p.gold, "problem_id": p.id,
                         "source": "arithmetic"})
        return rows, skipped, cfg.offset + len(rows)
    if not cfg.task.data:
        raise DataError(f"build-ift: task {cfg.task.name} needs task.data (a JSONL path or a hub id)")
    qf, af = cfg.task.question_field, cfg.task.answer_field
    everything = read_rows(cfg.task.data)
    if cfg.offset >= len(everything):
        raise DataError(f"no problems: offset {cfg.offset} is past the end of {cfg.task.data} ({len(everything)} rows)")
    read = everything[cfg.offset : None if cfg.limit is None else cfg.offset + cfg.limit]
    for lineno, row in read:
        problem = _field_problem(row, qf) or _field_problem(row, af)
        if problem:
            skip(problem, lineno)
            continue
        question, answer = row[qf], row[af]
        if cfg.task.name == "gsm8k":
            if "####" not in answer:
                skip("no '#### <answer>' line", lineno)
                continue
            steps, gold = gsm8k_reference_steps(answer), answer.rsplit("####", 1)[1].strip().replace(",", "")
        else:
            gold = last_boxed(answer)
            if gold is None:
                skip("no \\boxed{} answer", lineno)
                continue
            steps = math_reference_steps(answer)
        if len(steps) > cfg.max_steps:
            skip(f"more than {cfg.max_steps} steps", lineno)
            continue
        if max(len(s) for s in steps) > cfg.max_step_chars:
            skip(f"a step over {cfg.max_step_chars} characters", lineno)
            continue
        rows.append({"question": question.strip(), "steps": steps, "answer": gold,
                     "problem_id": f"{cfg.task.name}-{lineno:05d}", "source": cfg.task.data})
    return rows, skipped, cfg.offset + len(read)


def format_skipped(skipped: Counter | dict, lines: dict, data: str | None) -> str:
    """``2 missing field 'answer' (data.jsonl:3, 7); 1 no \\boxed{} answer (data.jsonl:9)`` or ``none``."""
    return "; ".join(f"{n} {why} ({data}:{', '.join(map(str, lines.get(why, [])))}"
                     f"{', ...' if n > len(lines.get(why, [])) else ''})" for why, n in skipped.items()) or "none"


def run_build_ift(cfg: BuildIFTConfig) -> dict:
    """Write ``cfg.out`` (and ``<out>.stats.json``); returns the stats."""
    lines: dict[str, list[int]] = {}
    rows, skipped, next_offset = ift_rows(cfg, lines)
    if not rows:
        raise DataError(f"build-ift: no usable rows in {cfg.task.data or cfg.task.name} from offset {cfg.offset}: "
                        f"every row was skipped ({format_skipped(skipped, lines, cfg.task.data)})")
    write_jsonl_atomic(cfg.out, rows)
    mean_steps = round(sum(len(r["steps"]) for r in rows) / len(rows), 2)
    # rows [offset, next_offset) were read: the next stage (build-eft, the rounds' search.offset) starts after them
    stats = {"rows": len(rows), "skipped": dict(skipped), "skipped_lines": lines, "mean_steps": mean_steps,
             "rows_read": [cfg.offset, next_offset], "next_offset": next_offset, "out": cfg.out}
    write_json_atomic(f"{cfg.out}.stats.json", stats)
    return stats
