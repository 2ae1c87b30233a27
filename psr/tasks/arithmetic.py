"""Built-in task: seeded multi-step arithmetic word problems whose every step is known.

Each problem is a chain: a starting quantity, then ``n_steps`` operations; each step applies exactly
one operation (+, -, *, /) to the running total, the first step combining the starting quantity with
the first change. Every intermediate result is known, so a model's step can be checked exactly, and
a right step can be corrupted into a surely wrong one (for judge training and evaluation).

Train and test never share a problem: a problem's split is decided by a hash of its text.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from psr.answers import last_boxed
from psr.steps import step_prefix
from psr.tasks.base import Problem, Task

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines", "Kai"]

# Each story: the thing counted and a sentence per operation ({x} is the operand).
STORIES = [
    dict(item="apples", start="{name} has {x} apples.",
         ops={"+": "Then {name} picks {x} more apples.", "-": "Then {name} eats {x} apples.",
              "*": "Then the number of apples becomes {x} times as large.",
              "/": "Then {name} shares the apples equally among {x} friends and keeps one share."}),
    dict(item="dollars", start="{name} saved {x} dollars.",
         ops={"+": "Then {name} earns {x} dollars.", "-": "Then {name} spends {x} dollars.",
              "*": "Then the savings grow to {x} times as much.",
              "/": "Then {name} splits the money into {x} equal parts and keeps one part."}),
    dict(item="books", start="A shelf holds {x} books.",
         ops={"+": "Then {name} adds {x} books to the shelf.", "-": "Then {name} removes {x} books.",
              "*": "Then the shelf is refilled so it holds {x} times as many books.",
              "/": "Then the books are divided equally into {x} boxes and only one box stays."}),
    dict(item="passengers", start="A bus carries {x} passengers.",
         ops={"+": "At the next stop {x} passengers get on.", "-": "At the next stop {x} passengers get off.",
              "*": "At the terminal the number of passengers becomes {x} times as many.",
              "/": "Then the passengers split equally into {x} groups and one group stays on."}),
    dict(item="eggs", start="A farm collects {x} eggs.",
         ops={"+": "Then the hens lay {x} more eggs.", "-": "Then {x} eggs break.",
              "*": "Then the stock grows to {x} times as many eggs.",
              "/": "Then the eggs are packed equally into {x} crates and one crate is kept."}),
]
QUESTION = {"apples": "How many apples does {name} have now?", "dollars": "How many dollars does {name} have now?",
            "books": "How many books are on the shelf now?", "passengers": "How many passengers are on the bus now?",
            "eggs": "How many eggs are kept?"}

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: Fraction(a, b)}
OP_WORD = {"+": "adding", "-": "subtracting", "*": "multiplying by", "/": "dividing by"}
CORRUPTIONS = ("wrong_result", "wrong_operation", "wrong_operand", "skipped_step", "wrong_stop")
EQUATION_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*/×x÷])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def _num(text: str) -> Fraction:
    return Fraction(text)


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else str(float(x))


def _step_text(n: int, a, op: str, b, result, final: bool) -> str:
    text = f"{step_prefix(n)}{OP_WORD[op].capitalize()} {_fmt(b)}: {_fmt(a)} {op} {_fmt(b)} = {_fmt(result)}."
    return text + (f" The answer is \\boxed{{{_fmt(result)}}}." if final else "")


@dataclass
class StepPair:
    """A right step against a surely wrong one at the same point of a problem (exact truth)."""

    problem: Problem
    step_index: int  # 0-based: the pair continues ``previous_steps`` = the first ``step_index`` reference steps
    previous_steps: list[str]
    chosen: str  # the reference step
    rejected: str  # a corruption of it that the exact check rejects
    kind: str  # which corruption


@dataclass
class ArithmeticTask(Task):
    min_steps: int = 2
    max_steps: int = 6
    max_operand: int = 20
    test_fraction: float = 0.2
    name = "arithmetic"

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"arithmetic task: need 1 <= min_steps <= max_steps, "
                             f"got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2:
            raise ValueError(f"arithmetic task: max_operand must be >= 2, got {self.max_operand}")

    # ---- generation -------------------------------------------------------------------------
    def generate_one(self, rng: random.Random, n_steps: int) -> Problem:
        story = rng.choice(STORIES)
        name = rng.choice(NAMES)
        value = rng.randint(2, self.max_operand)
        sentences = [story["start"].format(name=name, x=value)]
        chain = []  # (a, op, b, result) per step
        a = value
        for _ in range(n_steps):
            divisors = [d for d in range(2, 10) if a % d == 0 and d <= self.max_operand]
            choices = ["+", "*"] + (["-"] if a > 2 else []) + (["/"] if divisors else [])
            if a > 200:  # keep numbers readable: shrink instead of growing
                choices = [c for c in choices if c != "*"]
            op = rng.choice(choices)
            if op == "+":
                b = rng.randint(2, self.max_operand)
            elif op == "-":
                b = rng.randint(1, min(a - 1, self.max_operand))
            elif op == "*":
                b = rng.randint(2, 5)
            else:
                b = rng.choice(divisors)
            result = int(OPS[op](a, b))
            sentences.append(story["ops"][op].format(name=name, x=b))
            chain.append((a, op, b, result))
            a = result
        question = " ".join(sentences) + " " + QUESTION[story["item"]].format(name=name)
        steps = [_step_text(i + 1, *link, final=i == n_steps - 1) for i, link in enumerate(chain)]
        return Problem(
            id="", question=question, gold=str(a), reference_steps=steps,
            meta={"n_steps": n_steps, "chain": [list(link) for link in chain], "difficulty": f"{n_steps} steps"},
        )

    def split_of(self, question: str) -> str:
        h = int(hashlib.sha1(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return "test" if h < self.test_fraction else "train"

    def problems(self, split: str = "test", limit: int | None = None, seed: int = 0, offset: int = 0) -> list[Problem]:
        """``limit`` problems of ``split``, spread evenly over the step counts, reproducible per seed: positions
        ``offset`` to ``offset + limit`` of the one stream of distinct problems of (split, seed), so that two
        uses of the same stream at different offsets never share a problem (as two ranges of rows of a file)."""
        if split not in ("train", "test"):
            raise ValueError(f"arithmetic task: split must be 'train' or 'test', got {split!r}")
        if offset < 0:
            raise ValueError(f"arithmetic task: offset must be >= 0, got {offset}")
        limit = (100 if limit is None else limit) + offset
        counts = list(range(self.min_steps, self.max_steps + 1))
        rng = random.Random(f"arithmetic-{split}-{seed}")
        out, seen = [], set()
        attempts = 0
        while len(out) < limit:
            attempts += 1
            if attempts > 200 * limit + 1000:
                raise RuntimeError("arithmetic task: cannot find enough distinct problems; raise max_operand")
            n = counts[len(out) % len(counts)]
            p = self.generate_one(rng, n)
            if p.question in seen or self.split_of(p.question) != split:
                continue
            seen.add(p.question)
            p.id = f"arith-{split}-{seed}-{len(out):05d}"
            out.append(p)
        return out[offset:]

    def difficulty(self, problem: Problem) -> str | None:
        return problem.meta.get("difficulty")

    # ---- exact checks -----------------------------------------------------------------------
    def check_step(self, problem: Problem, previous_steps: list[str], step: str) -> bool | None:
        """Exact check of the step after ``previous_steps``: its (last) equation must be true and
        give this step's known result; a boxed answer must be the gold one and come only in the
        last step, which must give it (as the reference's last step does: a last step that stops
        short of the answer leads a small model to compute on past it, and a check that passed it would
        never prefer the step that answers). A step with neither an equation nor a boxed answer is
        unknown (None)."""
        chain = problem.meta["chain"]
        k, last = len(previous_steps), len(chain) - 1
        boxed = last_boxed(step)
        boxed_ok = boxed is not None and _is_number(boxed) and Fraction(boxed) == Fraction(problem.gold)
        eqs = EQUATION_RE.findall(step.replace(",", ""))
        if not eqs:
            return None if boxed is None else (k >= last and boxed_ok)
        if k > last:
            return False  # the problem is already solved: a further computation is off the path
        x, op, y, z = eqs[-1]
        op = {"×": "*", "x": "*", "÷": "/"}.get(op, op)
        if op == "/" and _num(y) == 0:
            return False
        ok = OPS[op](_num(x), _num(y)) == _num(z) and _num(z) == chain[k][3]
        if boxed is not None:
            ok = ok and k == last and boxed_ok
        elif k == last:
            ok = False
        return ok

    def recompute(self, problem: Problem, previous_steps: list[str], steps: dict[str, str]) -> str:
        """What a judge that reasons writes before its verdict, exactly: the next step computed from the problem,
        then each candidate's own calculation recomputed and held against it, e.g.

            Next step: 12 * 3 = 36.
            A: 12 * 3 = 36, right.
            B: 12 * 3 = 34, wrong: 12 * 3 = 36.
        """
        chain, k = problem.meta["chain"], len(previous_steps)
        if k < len(chain):
            a, op, b, result = chain[k]
            final = ", the answer" if k == len(chain) - 1 else ""
            lines = [f"Next step: {_fmt(a)} {op} {_fmt(b)} = {_fmt(result)}{final}."]
        else:
            lines = [f"The answer {problem.gold} is already reached."]
        lines += [f"{label}: {self._recheck(problem, previous_steps, step)}" for label, step in steps.items()]
        return "\n".join(lines)

    def _recheck(self, problem: Problem, previous_steps: list[str], step: str) -> str:
        """One candidate's line of :meth:`recompute`: its last calculation (or answer), right or why not."""
        chain, k = problem.meta["chain"], len(previous_steps)
        right = self.check_step(problem, previous_steps, step)
        boxed = last_boxed(step)
        eqs = EQUATION_RE.findall(step.replace(",", ""))
        if not eqs:
            if boxed is None:
                return "no calculation."
            return f"answer {boxed}, " + ("right." if right else "wrong.")
        x, op, y, z = eqs[-1]
        op = {"×": "*", "x": "*", "÷": "/"}.get(op, op)
        claim = f"{x} {op} {y} = {z}"
        if right:
            return f"{claim}, right."
        if op == "/" and _num(y) == 0:
            return f"{claim}, wrong: no division by 0."
        value = OPS[op](_num(x), _num(y))
        if value != _num(z):
            return f"{claim}, wrong: {x} {op} {y} = {_fmt(value)}."
        if k >= len(chain):
            return f"{claim}, wrong: the answer was already reached."
        if value != chain[k][3]:
            return f"{claim}, wrong: not the next step."
        if k < len(chain) - 1:
            return f"{claim}, wrong: it answers too early."
        if boxed is None:
            return f"{claim}, wrong: the last step gives the answer."
        return f"{claim}, wrong: the answer is not {boxed}."

    def step_pairs(self, split: str, n: int, seed: int, rng: random.Random, kinds=CORRUPTIONS,
                   cycle_kinds: bool = False) -> list[StepPair]:
        """One pair per problem of ``problems(split, n, seed)``: at a step ``k`` drawn from ``rng``,
        the reference step against a corruption of it (kind drawn from ``kinds``, or taken in turn with
        ``cycle_kinds``), redrawn until the exact check rejects it. The one source of judge (EFT),
        held-out judge-eval and oracle DPO pairs; each caller seeds ``rng`` with its own salt."""
        pairs = []
        for i, p in enumerate(self.problems(split, n, seed=seed)):
            k = rng.randrange(len(p.reference_steps))
            previous, good = p.reference_steps[:k], p.reference_steps[k]
            for _ in range(20):
                kind = kinds[i % len(kinds)] if cycle_kinds else rng.choice(list(kinds))
                bad = self.corrupt_step(p, k, kind, rng)
                if bad.strip() != good.strip() and self.check_step(p, previous, bad) is False:
                    break
            else:
                raise RuntimeError(f"could not corrupt step {k} of {p.id}")
            pairs.append(StepPair(p, k, previous, good, bad, kind))
        return pairs

    def corrupt_step(self, problem: Problem, k: int, kind: str, rng: random.Random) -> str:
        """A surely wrong version of reference step ``k`` (0-based)."""
        chain = problem.meta["chain"]
        a, op, b, result = chain[k]
        final = k == len(chain) - 1
        if kind == "wrong_result":
            delta = rng.choice([d for d in range(-5, 6) if d != 0 and result + d >= 0] or [1])
            bad = result + delta
            text = f"{step_prefix(k + 1)}{OP_WORD[op].capitalize()} {_fmt(b)}: {_fmt(a)} {op} {_fmt(b)} = {_fmt(bad)}."
            return text + (f" The answer is \\boxed{{{_fmt(bad)}}}." if final else "")
        if kind == "wrong_operation":
            others = [o for o in "+-*" if o != op and OPS[o](a, b) != result and OPS[o](a, b) >= 0]
            new_op = rng.choice(others)
            return _step_text(k + 1, a, new_op, b, OPS[new_op](a, b), final)
        if kind == "wrong_operand":
            candidates = [x for x in range(2, self.max_operand + 3) if x != b and OPS[op](a, x) != result
                          and (op != "/" or a % x == 0) and (op != "-" or a - x >= 0)]
            if not candidates:  # e.g. a prime under division: change the other operand instead
                a2 = a + rng.choice([1, 2, 3]) * b
                return _step_text(k + 1, a2, op, b, OPS[op](a2, b), final)
            x = rng.choice(candidates)
            return _step_text(k + 1, a, op, x, OPS[op](a, x), final)
        if kind == "skipped_step":
            # Jump over this step: apply the next operation to the current value (or, at the last
            # step, stop early and box the value from before this step).
            if k + 1 < len(chain):
                _, op2, b2, _ = chain[k + 1]
                value = OPS[op2](a, b2)
                if value == result or value < 0 or Fraction(value).denominator != 1:
                    return self.corrupt_step(problem, k, "wrong_result", rng)
                return _step_text(k + 1, a, op2, b2, value, k + 1 == len(chain) - 1)
            return f"{step_prefix(k + 1)}The answer is \\boxed{{{_fmt(a)}}}." if a != result \
                else self.corrupt_step(problem, k, "wrong_result", rng)
        if kind == "wrong_stop":
            # Right arithmetic, wrong ending: boxes this step's result before the last step, or at the
            # last step goes on computing instead of answering. Without it the judge never saw when a
            # solution should end: an M1 preferred "go on" to "answer" and DPO taught M2 not to stop.
            if not final:
                return _step_text(k + 1, a, op, b, result, final=True)
            x = rng.randint(2, 9)
            goes_on = f", then adding {x}: {_fmt(result)} + {x} = {_fmt(result + x)}."
            return _step_text(k + 1, a, op, b, result, final=False)[:-1] + goes_on
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")


def _is_number(text: str | None) -> bool:
    try:
        Fraction(text)
        return True
    except (TypeError, ValueError):
        return False
