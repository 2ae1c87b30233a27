"""``psr build-eft``: EFT (step-judge) data as the paper builds it: "by tree-search, initial data filtering
and data annotation", from the model's *own* candidate steps.

1. **Search.** Per problem, step by step: sample ``width`` candidate next steps (EDT), annotate each, and
   extend the path along a right candidate (a random one of them), or the reference step when none is
   right (so that every later step is judged after a right prefix); stop at the final answer.
2. **Annotate** every candidate (``annotator``):
   - ``exact``: the task's own step check (the built-in arithmetic task);
   - ``rollout``: Monte-Carlo, as Math-Shepherd does: ``rollouts`` completions from the prefix plus the
     step; the share that reach the gold answer. Right at ``>= right_threshold``, wrong at 0, else unsure
     (not used). Works for any dataset with gold answers (GSM8K, MATH, your own);
   - ``model``: a stronger judge model (hub id or local directory) compares the candidates pairwise in
     generate mode; a pair counts where both orders agree.
3. **Filter.** A pair is one right and one wrong candidate of the same step (at most ``pairs_per_step``);
   pairs are drawn round-robin over (step position, answers-now-vs-goes-on) groups so that no position or
   ending dominates; each pair is written in both orders, adjacent (``init``'s grouped batching keeps them
   in one batch), optionally with a short justification.

Writes ``out`` (EFT rows: question, previous_steps, step_a, step_b, verdict + metadata, what
``psr init --eft-data`` reads), ``<out>.steps.jsonl`` (every annotated step) and ``<out>.stats.json``.
Problems go in chunks saved as they finish, so a killed build resumes at its first unsaved chunk.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from psr.chunks import Chunks, made_by
from psr.config import ConfigError
from psr.engines import GenerationConfig, load_generator, release
from psr.files import write_json_atomic, write_jsonl_atomic
from psr.generation import generate
from psr.judge import JudgeConfig, StepJudge
from psr.models import ModelOptions
from psr.sampling import SamplingConfig
from psr.steps import format_solution, has_final_answer, render_prompt
from psr.tasks import TaskConfig, make_task
from psr.tasks.base import Task


@dataclass
class BuildEFTConfig(ModelOptions):
    model: str = "smollm2-135m"  # whose candidates: the model being initialised (or its IFT-only pass)
    task: TaskConfig = field(default_factory=TaskConfig)
    split: str = "train"  # arithmetic: train/test; gsm8k/math: the file itself
    limit: int | None = 200  # problems searched
    offset: int = 0  # skip problems used elsewhere (gsm8k/math: rows; arithmetic: positions in its stream)
    width: int = 4  # candidates per step
    max_steps: int = 8  # steps searched per problem at most
    max_step_tokens: int = 64  # new tokens per candidate step
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(policy="edt"))  # of the candidates
    annotator: Literal["exact", "rollout", "model"] = "exact"  # who labels the candidates (see the module doc)
    rollouts: int = 4  # rollout: completions per candidate
    rollout_max_new_tokens: int = 256  # rollout: tokens per completion
    right_threshold: float = 0.5  # rollout: share of completions reaching the gold for "right" (0 -> "wrong")
    annotator_model: str | None = None  # model: the stronger judge (hub id or directory)
    pairs_per_step: int = 2  # right-vs-wrong pairs kept per step (different wrong candidates first)
    max_pairs: int | None = None  # after balancing (null: every pair)
    both_orders: bool = True  # each pair as (right, wrong) and (wrong, right), adjacent
    justification: bool = False  # a short reason before the verdict (for generate-mode judges)
    template: str | None = None  # judge prompt template (judge.template); default psr.judge.JUDGE_PROMPT
    chunk_size: int = 16  # problems searched together; the unit of resume
    batch_size: int = 48  # sequences per generate call
    seed: int = 0  # problems (arithmetic), sampling and pair selection
    dtype: str | None = None  # model weights: float32, bfloat16 or auto (default: the loader's choice)
    # the engine behind the candidates and rollouts (hf or vllm; vLLM sampled candidates 6.4x faster here);
    # a `model` annotator's stronger judge always runs on HF
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    out: str = "data/eft.jsonl"  # the EFT rows; <out>.steps.jsonl and <out>.stats.json beside it

    def __post_init__(self):
        if self.width < 2:
            raise ValueError(f"width must be >= 2, got {self.width}")
        if not 0 < self.right_threshold <= 1:
            raise ValueError(f"right_threshold must be in (0, 1], got {self.right_threshold}")
        if self.annotator == "model" and not self.annotator_model:
            raise ValueError("annotator: model needs annotator_model (a hub id or a local model directory)")
        if self.rollouts < 1 or self.pairs_per_step < 1 or self.chunk_size < 1:
            raise ValueError("rollouts, pairs_per_step and chunk_size must be >= 1")


# ---------------------------------------------------------------------------------------------
# Annotators: (problems, prefixes, candidates) -> per step, a label per candidate (True/False/None)
# and the (right, wrong) index pairs it supports
# ---------------------------------------------------------------------------------------------
def exact_labels(task: Task, problems, prefixes, candidates) -> list[list[bool | None]]:
    return [[task.check_step(p, prefix, c) for c in cands] for p, prefix, cands in zip(problems, prefixes, candidates)]


def rollout_labels(task: Task, complete, problems, prefixes, candidates, cfg: BuildEFTConfig) -> tuple[list, list]:
    """Math-Shepherd's estimate: the share of ``cfg.rollouts`` completions from prefix + step that reach
    the gold answer, graded as evaluation grades (the first final answer decides; a rollout that gives
    none reaches nothing). A step that already boxes an answer is checked directly. ``complete(items, k)``
    returns k completions for each ``(question, steps)``, each stopped at its answer line (``model_completer``)."""
    jobs = []  # (step n, candidate i, (question, steps))
    for n, (p, prefix, cands) in enumerate(zip(problems, prefixes, candidates)):
        for i, c in enumerate(cands):
            if c.strip() and not has_final_answer(c):
                jobs.append((n, i, (p.question, prefix + [c])))
    completions = complete([j[2] for j in jobs], cfg.rollouts) if jobs else []
    shares = [[None] * len(c) for c in candidates]
    for n, (p, prefix, cands) in enumerate(zip(problems, prefixes, candidates)):
        for i, c in enumerate(cands):
            if not c.strip():
                shares[n][i] = 0.0
            elif has_final_answer(c):
                shares[n][i] = float(task.check_answer(p, format_solution(prefix + [c])))
    for (n, i, _), outs in zip(jobs, completions):
        if outs is None:  # no room for a rollout: unsure (no label), not wrong (psr.lengths)
            continue
        solution = format_solution(prefixes[n] + [candidates[n][i]])
        shares[n][i] = sum(task.check_answer(problems[n], solution + o) for o in outs) / len(outs)
    labels = [[True if s >= cfg.right_threshold else (False if s == 0 else None) for s in row] for row in shares]
    return labels, shares


def model_pairs(judge: StepJudge, problems, prefixes, candidates) -> list[list[tuple[int, int]]]:
    """(i, j) where the stronger judge prefers i over j in both orders."""
    comps = judge.compare([(p.question, prefix, c) for p, prefix, c in zip(problems, prefixes, candidates)])
    return [[(i, j) for i, j in permutations(range(len(c.wins)), 2) if c.wins[i][j]] for c in comps]


def model_completer(model, tok, cfg: BuildEFTConfig, sampling: SamplingConfig, max_new_tokens: int, stop_at_step: bool):
    """``complete([(question, steps so far), ...], k) -> [[k completions], ...]`` with the model, batched: one
    step each (``stop_at_step``), or whole rollouts stopped at the line of their first answer (what the
    grader reads; text after it could box another answer)."""

    def complete(items, k):
        from psr.lengths import fits

        prompts = [render_prompt(tok, q, steps) for q, steps in items]
        ok = fits(model, tok, prompts, max_new_tokens)  # None for a prompt without room (psr.lengths)
        outs = iter(generate(model, tok, [p for p, f in zip(prompts, ok) if f], sampling, max_new_tokens,
                             cfg.batch_size, num_samples=k, stop_at_step=stop_at_step,
                             stop_at_answer=not stop_at_step, progress=False))
        return [next(outs) if f else None for f in ok]

    return complete


def annotate(task: Task, cfg: BuildEFTConfig, complete=None, judge=None):
    """``annotate(problems, prefixes, candidates) -> (labels, rollout shares, (right, wrong) index pairs)``."""

    def run(problems, prefixes, cands):
        shares = [None] * len(cands)
        if cfg.annotator == "exact":
            labels = exact_labels(task, problems, prefixes, cands)
        elif cfg.annotator == "rollout":
            labels, shares = rollout_labels(task, complete, problems, prefixes, cands, cfg)
        else:
            labels = [[None] * len(c) for c in cands]
        pairs = (model_pairs(judge, problems, prefixes, cands) if cfg.annotator == "model" else
                 [[(i, j) for i, j in permutations(range(len(lab)), 2) if lab[i] is True and lab[j] is False]
                  for lab in labels])
        return labels, shares, pairs

    return run


# ---------------------------------------------------------------------------------------------
# Search along right candidates
# ---------------------------------------------------------------------------------------------
def search_chunk(problems, propose, annotate_fn, cfg: BuildEFTConfig, rng=None) -> list[dict]:
    """Every annotated step of these problems (one row per step). ``propose(items, k)`` gives k candidate
    next steps per ``(question, prefix)``; ``annotate_fn`` labels them (see ``annotate``)."""
    rng = rng or random.Random(cfg.seed)
    states = [{"problem": p, "path": []} for p in problems]
    steps = []
    for depth in range(cfg.max_steps):
        active = [s for s in states if not s.get("done")]
        if not active:
            break
        probs, prefixes = [s["problem"] for s in active], [list(s["path"]) for s in active]
        cands = propose([(p.question, prefix) for p, prefix in zip(probs, prefixes)], cfg.width)
        for st, c in zip(active, cands):
            if c is None:  # the next step's prompt does not fit the context (psr.lengths): the problem stops,
                st["done"] = True  # recorded as a step row without candidates, which the stats count
                steps.append({"problem_id": st["problem"].id, "question": st["problem"].question,
                              "gold": st["problem"].gold, "step_index": depth, "previous_steps": list(st["path"]),
                              "candidates": [], "labels": [], "rollout_shares": None, "pairs": [], "too_long": True})
        keep = [i for i, c in enumerate(cands) if c is not None]
        active, probs, prefixes, cands = ([x[i] for i in keep] for x in (active, probs, prefixes, cands))
        if not active:
            continue
        labels, shares, pairs = annotate_fn(probs, prefixes, cands)
        for s, prefix, c, lab, share, pr in zip(active, prefixes, cands, labels, shares, pairs):
            p = s["problem"]
            steps.append({"problem_id": p.id, "question": p.question, "gold": p.gold, "step_index": depth,
                          "previous_steps": prefix, "candidates": c, "labels": lab, "rollout_shares": share,
                          "pairs": pr})
            right = sorted({i for i, _ in pr} | {i for i, x in enumerate(lab) if x is True})
            ref = p.reference_steps or []
            if right:
                nxt = c[rng.choice(right)]
            elif depth < len(ref):
                nxt = ref[depth]  # no right candidate: go on from the reference so later steps have a right prefix
            else:
                s["done"] = True
                continue
            s["path"].append(nxt)
            if has_final_answer(nxt) or len(s["path"]) >= cfg.max_steps:
                s["done"] = True
    return steps


# ---------------------------------------------------------------------------------------------
# Filtering: right-vs-wrong pairs, balanced over positions and endings, both orders
# ---------------------------------------------------------------------------------------------
def ending(right: str, wrong: str) -> str:
    a, b = has_final_answer(right), has_final_answer(wrong)
    return "right_answers" if a and not b else ("right_goes_on" if b and not a else "same")


def select_pairs(steps: list[dict], cfg: BuildEFTConfig, rng: random.Random) -> list[dict]:
    """At most ``pairs_per_step`` distinct (right, wrong) pairs per step, then a round-robin draw over
    (step index, ending) groups up to ``max_pairs``."""
    groups = defaultdict(list)
    for s in steps:
        options = [(i, j) for i, j in s["pairs"] if s["candidates"][i].strip() and s["candidates"][j].strip()
                   and s["candidates"][i].strip() != s["candidates"][j].strip()]
        rng.shuffle(options)
        chosen, used_wrong, used_text = [], set(), set()
        for new_wrong_only in (True, False):  # pairs with a wrong step not used yet first, then any
            for i, j in options:
                key = (s["candidates"][i].strip(), s["candidates"][j].strip())
                if key in used_text or len(chosen) >= cfg.pairs_per_step or (new_wrong_only and key[1] in used_wrong):
                    continue
                chosen.append((i, j))
                used_wrong.add(key[1])
                used_text.add(key)
        for i, j in chosen:
            right, wrong = s["candidates"][i], s["candidates"][j]
            groups[(s["step_index"], ending(right, wrong))].append({**s, "right": right, "wrong": wrong, "ij": [i, j]})
    order = sorted(groups)
    for k in order:
        rng.shuffle(groups[k])
    picked, limit = [], cfg.max_pairs if cfg.max_pairs is not None else sum(map(len, groups.values()))
    while len(picked) < limit and any(groups[k] for k in order):
        for k in order:
            if groups[k] and len(picked) < limit:
                picked.append(groups[k].pop())
    return picked


def _why(right_pos: str, pair: dict) -> str:
    wrong_pos = "B" if right_pos == "A" else "A"
    shares = pair.get("rollout_shares")
    if shares:
        i, j = pair["ij"]
        return (f"Candidate {right_pos} leads to the right answer ({shares[i]:.0%} of continuations); candidate "
                f"{wrong_pos} does not ({shares[j]:.0%}).")
    return f"Candidate {right_pos} is a correct next step; candidate {wrong_pos} is not."


def eft_rows(pairs: list[dict], cfg: BuildEFTConfig, rng: random.Random) -> list[dict]:
    rows = []
    for n, p in enumerate(pairs):
        orders = [True, False] if cfg.both_orders else [n % 2 == 0]
        for right_first in orders:
            a, b, verdict = (p["right"], p["wrong"], "A") if right_first else (p["wrong"], p["right"], "B")
            row = {"question": p["question"], "previous_steps": p["previous_steps"], "step_a": a, "step_b": b,
                   "verdict": verdict, "problem_id": p["problem_id"], "step_index": p["step_index"],
                   "ending": ending(p["right"], p["wrong"]), "annotator": cfg.annotator, "source": "search"}
            if cfg.justification:
                row["justification"] = _why(verdict, p)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run_build_eft(cfg: BuildEFTConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    from psr.models import load_model, model_options

    out = Path(cfg.out)
    task = make_task(cfg.task)
    if cfg.annotator == "exact" and type(task).check_step is Task.check_step:
        raise ConfigError(f"annotator 'exact' needs a task that checks steps; {task.name!r} cannot: "
                          "use annotator: rollout")
    problems = task.problems(cfg.split, cfg.limit, seed=cfg.seed, offset=cfg.offset)
    # filtering and writing happen after the search, from every chunk: their settings change no chunk
    after = ("pairs_per_step", "max_pairs", "both_orders", "justification")
    settings = {k: v for k, v in asdict(cfg).items() if k not in after}
    store = Chunks(out.parent / f"{out.name}.chunks", made_by(settings, cfg.model, cfg.annotator_model), problems,
                   cfg.chunk_size, what="build-eft chunk")
    store.prepare()
    todo = store.pending()
    seconds = 0.0
    if todo:
        own_model = model is None
        if own_model:
            model, tokenizer = load_generator(cfg.model, cfg.dtype, None, cfg.generation, options=cfg)
        judge = None
        if cfg.annotator == "model":
            strong, strong_tok = load_model(cfg.annotator_model, dtype=cfg.dtype, options=model_options(cfg))
            judge = StepJudge(strong, strong_tok,
                              JudgeConfig(mode="generate", aggregation="agree", template=cfg.template))
        propose = model_completer(model, tokenizer, cfg, cfg.sampling, cfg.max_step_tokens, stop_at_step=True)
        rollout = model_completer(model, tokenizer, cfg, SamplingConfig(policy="fixed", temperature=0.7),
                                  cfg.rollout_max_new_tokens, stop_at_step=False)
        annotate_fn = annotate(task, cfg, rollout, judge)
        bar = tqdm(total=sum(len(store.chunks[c]) for c in todo), desc="build-eft", unit="problem",
                   disable=not progress, dynamic_ncols=True)
        started = time.perf_counter()
        for c in todo:
            torch.manual_seed(cfg.seed * 1_000_003 + c)  # per-chunk seeds: a resumed build equals a straight one
            store.save(c, search_chunk(store.chunks[c], propose, annotate_fn, cfg, random.Random(f"{cfg.seed}-{c}")))
            bar.update(len(store.chunks[c]))
        bar.close()
        seconds = time.perf_counter() - started
        if own_model:
            release(model)
    steps = store.rows()
    rng = random.Random(cfg.seed)
    pairs = select_pairs(steps, cfg, rng)
    rows = eft_rows(pairs, cfg, rng)
    write_jsonl_atomic(out.parent / f"{out.name}.steps.jsonl", steps)
    write_jsonl_atomic(out, rows)
    labels = [x for s in steps for x in s["labels"]]
    stats = {
        "problems": len(problems), "steps": sum(not s.get("too_long") for s in steps), "candidates": len(labels),
        # the length guard (psr.lengths): problems stopped because their next prompt did not fit the context;
        # candidates left unsure because their rollout prompt did not
        "problems_too_long": sum(bool(s.get("too_long")) for s in steps),
        "rollouts_too_long": sum(x is None for s in steps for x in (s.get("rollout_shares") or [])),
        "labels": {"right": sum(x is True for x in labels), "wrong": sum(x is False for x in labels),
                   "unknown": sum(x is None for x in labels)},
        "steps_with_a_pair": sum(bool(s["pairs"]) for s in steps),
        "pairs": len(pairs), "rows": len(rows),
        "pairs_per_step_index": dict(sorted(Counter(p["step_index"] for p in pairs).items())),
        "pairs_per_ending": dict(Counter(ending(p["right"], p["wrong"]) for p in pairs)),
        "search_seconds": round(seconds, 1),
        "candidates_per_minute": round(len(labels) / seconds * 60, 1) if seconds else None,
        "config": asdict(cfg),
    }
    write_json_atomic(out.parent / f"{out.name}.stats.json", stats)
    return stats


def format_stats(stats: dict) -> str:
    return (f"{stats['problems']} problems, {stats['steps']} steps, {stats['candidates']} candidates "
            f"(right {stats['labels']['right']}, wrong {stats['labels']['wrong']}, "
            f"unknown {stats['labels']['unknown']}); "
            f"{stats['pairs']} pairs -> {stats['rows']} EFT rows; by step {stats['pairs_per_step_index']}, "
            f"by ending {stats['pairs_per_ending']}; {stats['candidates_per_minute']} candidates/min")
