"""Disjoint data by construction: which problems each part of a run uses, and the check, at run start, that
what trains the policy or the judge (IFT rows, EFT rows and the EFT search's problems), what each round
searches (and then trains on) and what the benchmarks hold out never share a problem.

Init and the rounds read one sequence of the task's problems (a file's rows, or the built-in task's
stream of problems for the run's seed): the IFT rows made from the task are its first problems, the EFT
search takes the next ones, and round r searches ``problems_per_round`` problems from
``round_offset(cfg, r)`` -- right after init's unless ``search.offset`` says where. Data that come from
files (``init.ift_data``, ``init.eft_data``, a given ``m1``'s training rows) are compared by question.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from psr.files import DataError


def _key(question: str) -> str:
    return " ".join(str(question).split())


def round_offset(cfg, r: int) -> int:
    """The first problem round ``r`` searches: ``search.offset`` (null: after init's problems) + (r - 1) x
    problems_per_round."""
    from psr.train.sft import task_problems_used

    start = cfg.search.offset
    if start is None:
        start = task_problems_used(cfg.init) if cfg.m1 is None else 0
    return start + (r - 1) * cfg.problems_per_round


def round_problems(cfg, r: int) -> list:
    from psr.search import search_problems

    scfg = dataclasses.replace(cfg.search, task=cfg.task, split="train", limit=cfg.problems_per_round,
                               offset=round_offset(cfg, r), data_seed=cfg.seed)
    return search_problems(scfg)


def _file_questions(path: str) -> set[str]:
    from psr.tasks.jsonl import read_rows

    return {_key(row["question"]) for _, row in read_rows(path) if isinstance(row.get("question"), str)}


def training_sets(cfg) -> dict[str, set[str]]:
    """Name -> questions of every set that trains M1 (a given M1: the ift.jsonl/eft.jsonl saved beside it)."""
    from psr.tasks import make_task
    from psr.train.sft import eft_search_offset, eft_source, ift_from_task

    sets: dict[str, set[str]] = {}
    if cfg.m1 is not None:
        for name in ("ift.jsonl", "eft.jsonl"):
            if Path(cfg.m1, name).is_file():
                sets[f"the {name} that trained m1 ({cfg.m1})"] = _file_questions(str(Path(cfg.m1, name)))
        return sets
    init, task = cfg.init, make_task(cfg.task)
    n_ift = ift_from_task(init)
    if init.ift_data:
        sets[f"init.ift_data ({init.ift_data})"] = _file_questions(init.ift_data)
    elif n_ift:
        problems = task.problems("train", None if n_ift >= 10**9 else n_ift, seed=cfg.seed)
        sets[f"init's IFT problems (the task's first {len(problems)})"] = {_key(p.question) for p in problems}
    source = eft_source(init)
    if source == "file" and init.eft_data:
        sets[f"init.eft_data ({init.eft_data})"] = _file_questions(init.eft_data)
    elif source == "search":
        start, n = eft_search_offset(init), init.eft_search.limit
        problems = task.problems(init.eft_search.split, n, seed=cfg.seed, offset=start)
        sets[f"init's EFT search (problems {start}-{start + len(problems) - 1})"] = {_key(p.question) for p in problems}
    elif source == "corruptions" and init.eft_examples != 0 and cfg.task.name == "arithmetic":
        n = 400 if init.eft_examples is None else init.eft_examples
        pairs = (n + 1) // 2 if init.eft_both_orders else n
        sets["init's EFT corruptions"] = {_key(p.question) for p in task.problems("train", pairs, seed=cfg.seed + 1)}
    return sets


def _overlap(a_name: str, a: set[str], b_name: str, b: set[str], hint: str) -> None:
    shared = a & b
    if shared:
        example = next(iter(sorted(shared)))
        raise DataError(f"{a_name} and {b_name} share {len(shared)} problem(s) (e.g. {example[:70]!r}); {hint}")


def free_offset(cfg, trained: set[str], scan: int = 5000) -> int | None:
    """The first ``search.offset`` from which all the rounds' problems are outside ``trained`` (None: not within
    ``scan`` problems of the current start, or the data end first). An M1 from another run or seed trained on
    problems scattered through this run's stream, so the place right after init's is not always free."""
    from psr.search import search_problems

    start, need = round_offset(cfg, 1), cfg.rounds * cfg.problems_per_round
    scfg = dataclasses.replace(cfg.search, task=cfg.task, split="train", limit=start + scan + need, offset=0,
                               data_seed=cfg.seed)
    keys = [_key(p.question) for p in search_problems(scfg)]
    bad = [i for i, k in enumerate(keys) if k in trained]
    for o in range(start, len(keys) - need + 1):
        if not any(o <= i < o + need for i in bad):
            return o
    return None


def check_disjoint(cfg) -> None:
    """Refuse a run whose rounds search problems that trained M1, whose rounds overlap each other, or whose
    benchmarks hold out problems the run trains on; the message names both sets and how to move one."""
    rounds = {}
    for r in range(1, cfg.rounds + 1 if cfg.methods else 1):
        start = round_offset(cfg, r)
        problems = round_problems(cfg, r)
        rounds[f"round {r}'s search (problems {start}-{start + len(problems) - 1})"] = {
            _key(p.question) for p in problems}
    training = training_sets(cfg)
    move = "set search.offset past them (or give the rounds other data)"
    if any(r_set & t_set for r_set in rounds.values() for t_set in training.values()):
        free = free_offset(cfg, set().union(*training.values()))
        if free is not None:
            move = f"set search.offset: {free} (the first place where every round's problems are new to M1)"
    for r_name, r_set in rounds.items():
        for t_name, t_set in training.items():
            _overlap(r_name, r_set, t_name, t_set, move)
    names = list(rounds)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            _overlap(a, rounds[a], b, rounds[b], "rounds must search new problems")
    if not cfg.benchmarks:
        return
    from psr.tasks import make_task

    trained = {**training, **rounds}
    for b in cfg.benchmarks:
        seed = cfg.seed if b.seed is None else b.seed
        held_out = {_key(p.question) for p in make_task(b.task).problems(b.split, b.limit, seed=seed, offset=b.offset)}
        for t_name, t_set in trained.items():
            _overlap(f"benchmark {b.name}", held_out, t_name, t_set,
                     f"a benchmark must hold out problems the run never trains on: move benchmark {b.name}'s "
                     "offset or the training rows")
