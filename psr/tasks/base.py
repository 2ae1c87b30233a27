"""What every task provides: problems with a gold answer, and answer checking."""

from __future__ import annotations

from dataclasses import dataclass, field

from psr.answers import is_correct


@dataclass
class Problem:
    id: str
    question: str
    gold: str
    # Step-formatted reference solution (``Step n: ...`` lines), when the task has one.
    reference_steps: list[str] | None = None
    # Task-specific facts: difficulty, intermediate results, source line ...
    meta: dict = field(default_factory=dict)


class Task:
    name = "task"

    def problems(self, split: str = "test", limit: int | None = None, seed: int = 0, offset: int = 0) -> list[Problem]:
        """``limit`` problems from position ``offset`` on (a file's rows; the built-in task's stream of
        (split, seed)). Two ranges that do not overlap share no problem."""
        raise NotImplementedError

    def check_answer(self, problem: Problem, solution: str) -> bool:
        return is_correct(problem.gold, solution)

    def check_step(self, problem: Problem, previous_steps: list[str], step: str) -> bool | None:
        """Is ``step`` a right next step after ``previous_steps``? None when the task cannot tell."""
        return None

    def difficulty(self, problem: Problem) -> str | None:
        """A label to break accuracy down by, when the task has one."""
        return None

    def recompute(self, problem: Problem, previous_steps: list[str], steps: dict[str, str]) -> str | None:
        """An exact justification for judging ``steps`` (label -> candidate next step after ``previous_steps``):
        the right next step, then each candidate recomputed against it. None when the task cannot write one."""
        return None
