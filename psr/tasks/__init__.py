"""Tasks: where problems, gold answers and (for the built-in task) step truth come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psr.tasks.arithmetic import ArithmeticTask
from psr.tasks.base import Problem, Task
from psr.tasks.jsonl import DataError, JsonlMathTask

TASKS = ("arithmetic", "gsm8k", "math")


@dataclass
class TaskConfig:
    """Where problems come from: the built-in arithmetic generator or a GSM8K/MATH-style JSONL."""

    name: Literal["arithmetic", "gsm8k", "math"] = "arithmetic"  # arithmetic: built-in, exact step truth
    data: str | None = None  # gsm8k/math: a JSONL path or a hub id (id:split, e.g. openai/gsm8k:test)
    min_steps: int = 2  # arithmetic: fewest steps (operations) per problem
    max_steps: int = 6  # arithmetic: most steps per problem
    max_operand: int = 20  # arithmetic: largest operand
    question_field: str = "question"  # gsm8k/math: field names in the data (e.g. problem/solution for NuminaMath)
    answer_field: str = "answer"  # gsm8k/math: the field holding the reference solution with the gold answer
    # gsm8k/math: what answer_field holds. solution: a reference solution, gold after '####' (gsm8k) or in its last
    # \boxed{} (math); final: the final answer itself (AIME's 204, OlympiadBench's ["$\frac{1}{2}$"]), no steps
    answer_format: Literal["solution", "final"] = "solution"
    subset: str | None = None  # a hub dataset's configuration (OlympiadBench: OE_TO_maths_en_COMP); gsm8k: main

    def __post_init__(self):
        if self.name == "arithmetic" and self.data is not None:
            raise ValueError(f"data is {self.data!r}, but the arithmetic task generates its problems and reads "
                             "no data file: leave data out, or choose task gsm8k or math")
        if not 1 <= self.min_steps <= self.max_steps or self.max_operand < 2:
            raise ValueError(f"need 1 <= min_steps <= max_steps and max_operand >= 2, got min_steps "
                             f"{self.min_steps}, max_steps {self.max_steps}, max_operand {self.max_operand}")


def make_task(cfg: TaskConfig | str, data: str | None = None) -> Task:
    if isinstance(cfg, str):
        cfg = TaskConfig(name=cfg, data=data)
    if cfg.name == "arithmetic":
        return ArithmeticTask(min_steps=cfg.min_steps, max_steps=cfg.max_steps, max_operand=cfg.max_operand)
    if cfg.name in ("gsm8k", "math"):
        return JsonlMathTask(kind=cfg.name, data=cfg.data, question_field=cfg.question_field,
                             answer_field=cfg.answer_field, answer_format=cfg.answer_format, subset=cfg.subset)
    raise ValueError(f"unknown task {cfg.name!r}; choose from {', '.join(TASKS)}")


__all__ = ["ArithmeticTask", "DataError", "JsonlMathTask", "Problem", "Task", "TaskConfig", "TASKS", "make_task"]
