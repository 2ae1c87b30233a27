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

Two drivers run the search (``driver``), with the same results: ``lockstep`` (``search_chunk``: a chunk's
problems advance one phase at a time, all candidates, then all rollouts, ...) is the short reference;
``inflight`` (``InflightEFT``, issue 30) keeps every problem in flight, each advancing as soon as its own
candidates or rollouts come back. Every candidate and rollout samples under its own seed (``candidate_seeds``,
``rollout_seeds``) and the next step is drawn with the problem's own RNG (``step_rng``), so a problem's rows do
not depend on what it was batched with, on the chunk size or on the driver.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from psr.chunks import Chunks, made_by
from psr.config import ConfigError
from psr.engines import GenerationConfig, load_generator, release
from psr.files import write_json_atomic, write_jsonl_atomic
from psr.generation import cut_after_answer, cut_at_step_boundary, generate
from psr.inflight import InFlight, mix_seed
from psr.judge import JudgeConfig, StepJudge
from psr.lengths import fits
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
    justification: bool = False  # a reason before the verdict (for generate-mode judges)
    # reason: one sentence on which candidate is right (from the labels); recompute: the judge that reasons
    # exactly, the next step computed from the problem and each candidate's calculation held against it
    # (task.recompute: the built-in arithmetic task)
    justification_kind: Literal["reason", "recompute"] = "reason"
    template: str | None = None  # judge prompt template (judge.template); default psr.judge.JUDGE_PROMPT
    chunk_size: int = 16  # problems saved together: the unit of resume (lockstep: also searched together)
    batch_size: int = 48  # sequences per generate call
    # inflight = every problem in flight, each advancing on its own (InflightEFT; on vLLM the engine's request
    # queue kept full); lockstep = a chunk's problems advance one phase at a time (search_chunk, the reference).
    # Same rows either way (per-request seeds); an `annotator: model` build always runs lockstep
    driver: Literal["inflight", "lockstep"] = "inflight"
    inflight: int = 64  # inflight driver: problems in flight (chunks are pulled in as others finish)
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
        if min(self.rollouts, self.pairs_per_step, self.chunk_size, self.max_steps, self.batch_size) < 1:
            raise ValueError("rollouts, pairs_per_step, chunk_size, max_steps and batch_size must be >= 1")


# ---------------------------------------------------------------------------------------------
# Seeds: every sampled completion its own, from what it is (not from what it was batched with)
# ---------------------------------------------------------------------------------------------
ROLLOUT_SAMPLING = SamplingConfig(policy="fixed", temperature=0.7)  # the rollouts' sampling


def candidate_seeds(cfg: BuildEFTConfig, problem_id: str, step: int) -> list[int]:
    """The seeds of a step's ``width`` candidates (``step``: the path's length)."""
    return [mix_seed("eft-candidate", cfg.seed, problem_id, step, k) for k in range(cfg.width)]


def rollout_seeds(cfg: BuildEFTConfig, problem_id: str, step: int, candidate: int) -> list[int]:
    """The seeds of the ``rollouts`` completions that follow candidate ``candidate`` of a step."""
    return [mix_seed("eft-rollout", cfg.seed, problem_id, step, candidate, r) for r in range(cfg.rollouts)]


def step_rng(cfg: BuildEFTConfig, problem_id: str, step: int) -> random.Random:
    """Which right candidate a problem goes on along, at a step: its own draw."""
    return random.Random(f"{cfg.seed}-{problem_id}-{step}")


# ---------------------------------------------------------------------------------------------
# Annotators: (problems, prefixes, candidates) -> per step, a label per candidate (True/False/None)
# and the (right, wrong) index pairs it supports
# ---------------------------------------------------------------------------------------------
def exact_labels(task: Task, problems, prefixes, candidates) -> list[list[bool | None]]:
    return [[task.check_step(p, prefix, c) for c in cands] for p, prefix, cands in zip(problems, prefixes, candidates)]


def needs_rollouts(step: str) -> bool:
    """Only a step that is neither empty nor boxes an answer needs rollouts to be graded."""
    return bool(step.strip()) and not has_final_answer(step)


def rollout_shares(task: Task, problem, prefix: list[str], cands: list[str], completions: dict) -> list[float | None]:
    """Per candidate, the share of its rollouts (``completions[i]``) that reach the gold, graded as evaluation
    grades (the first final answer decides; a rollout that gives none reaches nothing). An empty step reaches
    nothing; a step that boxes an answer is checked directly; ``completions[i]`` None (no room for a rollout,
    psr.lengths): None, unsure, not wrong."""
    shares = []
    for i, c in enumerate(cands):
        if not c.strip():
            shares.append(0.0)
        elif has_final_answer(c):
            shares.append(float(task.check_answer(problem, format_solution(prefix + [c]))))
        elif completions.get(i) is None:
            shares.append(None)
        else:
            solution = format_solution(prefix + [c])
            shares.append(sum(task.check_answer(problem, solution + o) for o in completions[i]) / len(completions[i]))
    return shares


def share_labels(shares: list, threshold: float) -> list[bool | None]:
    """Right at ``>= threshold``, wrong at 0, else (or no share) unsure."""
    return [None if s is None else (True if s >= threshold else (False if s == 0 else None)) for s in shares]


def rollout_labels(task: Task, complete, problems, prefixes, candidates, cfg: BuildEFTConfig) -> tuple[list, list]:
    """Math-Shepherd's estimate (``rollout_shares``) for a batch of steps. ``complete(items, k)`` returns k
    completions for each ``(question, steps)``, each stopped at its answer line, or None where there is no room
    (``model_completer``; one that is ``seeded`` also gets each item's seeds, ``rollout_seeds``)."""
    jobs = [(n, i) for n, cands in enumerate(candidates) for i, c in enumerate(cands) if needs_rollouts(c)]
    items = [(problems[n].question, prefixes[n] + [candidates[n][i]]) for n, i in jobs]
    if getattr(complete, "seeded", False):
        seeds = [rollout_seeds(cfg, problems[n].id, len(prefixes[n]), i) for n, i in jobs]
        completions = complete(items, cfg.rollouts, seeds) if jobs else []
    else:
        completions = complete(items, cfg.rollouts) if jobs else []
    done = defaultdict(dict)
    for (n, i), outs in zip(jobs, completions):
        done[n][i] = outs
    shares = [rollout_shares(task, p, prefix, cands, done[n])
              for n, (p, prefix, cands) in enumerate(zip(problems, prefixes, candidates))]
    return [share_labels(row, cfg.right_threshold) for row in shares], shares


def model_pairs(judge: StepJudge, problems, prefixes, candidates) -> list[list[tuple[int, int]]]:
    """(i, j) where the stronger judge prefers i over j in both orders."""
    comps = judge.compare([(p.question, prefix, c) for p, prefix, c in zip(problems, prefixes, candidates)])
    return [[(i, j) for i, j in permutations(range(len(c.wins)), 2) if c.wins[i][j]] for c in comps]


def model_completer(model, tok, cfg: BuildEFTConfig, sampling: SamplingConfig, max_new_tokens: int, stop_at_step: bool):
    """``complete([(question, steps so far), ...], k, seeds=None) -> [[k completions], ...]`` with the model,
    batched: one step each (``stop_at_step``), or whole rollouts stopped at the line of their first answer (what
    the grader reads; text after it could box another answer). ``seeds``: k per item, one per completion."""

    def complete(items, k, seeds=None):
        prompts = [render_prompt(tok, q, steps) for q, steps in items]
        ok = fits(model, tok, prompts, max_new_tokens)  # None for a prompt without room (psr.lengths)
        outs = iter(generate(model, tok, [p for p, f in zip(prompts, ok) if f], sampling, max_new_tokens,
                             cfg.batch_size, num_samples=k, stop_at_step=stop_at_step,
                             stop_at_answer=not stop_at_step, progress=False,
                             seeds=None if seeds is None else [s for s, f in zip(seeds, ok) if f]))
        return [next(outs) if f else None for f in ok]

    complete.seeded = True
    return complete


def right_wrong_pairs(labels: list) -> list[tuple[int, int]]:
    return [(i, j) for i, j in permutations(range(len(labels)), 2) if labels[i] is True and labels[j] is False]


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
                 [right_wrong_pairs(lab) for lab in labels])
        return labels, shares, pairs

    return run


# ---------------------------------------------------------------------------------------------
# Search along right candidates: the step logic both drivers share
# ---------------------------------------------------------------------------------------------
def step_row(problem, prefix: list[str], cands: list[str], labels, shares, pairs) -> dict:
    """One annotated step, as ``<out>.steps.jsonl`` holds it (``select_pairs`` and the stats read these)."""
    return {"problem_id": problem.id, "question": problem.question, "gold": problem.gold, "step_index": len(prefix),
            "previous_steps": list(prefix), "candidates": cands, "labels": labels, "rollout_shares": shares,
            "pairs": pairs}


def too_long_row(problem, prefix: list[str]) -> dict:
    """The next step's prompt does not fit the context (psr.lengths): the problem stops, recorded as a step row
    without candidates, which the stats count."""
    return {**step_row(problem, prefix, [], [], None, []), "too_long": True}


def advance(path: list[str], problem, cands: list[str], labels, pairs, cfg: BuildEFTConfig, rng) -> bool:
    """Extend ``path`` along a right candidate (``rng`` draws one), or the reference step when none is right (so
    later steps have a right prefix). False when the problem is done: it answered, reached ``max_steps``, or has
    neither a right candidate nor a reference step left."""
    right = sorted({i for i, _ in pairs} | {i for i, x in enumerate(labels) if x is True})
    ref = problem.reference_steps or []
    if right:
        nxt = cands[rng.choice(right)]
    elif len(path) < len(ref):
        nxt = ref[len(path)]
    else:
        return False
    path.append(nxt)
    return not has_final_answer(nxt) and len(path) < cfg.max_steps


def search_chunk(problems, propose, annotate_fn, cfg: BuildEFTConfig, rng=None) -> list[dict]:
    """The lockstep driver: every annotated step of these problems (one row per step, problem by problem),
    all of them proposing, then all annotated, step after step. ``propose(items, k)`` gives k candidate next
    steps per ``(question, prefix)`` (None: no room; one that is ``seeded`` also gets ``candidate_seeds``);
    ``annotate_fn`` labels them (see ``annotate``). ``rng``: one draw for all (default: ``step_rng``'s)."""
    states = [{"problem": p, "path": [], "rows": [], "done": False} for p in problems]
    while active := [s for s in states if not s["done"]]:
        probs, prefixes = [s["problem"] for s in active], [list(s["path"]) for s in active]
        items = [(p.question, prefix) for p, prefix in zip(probs, prefixes)]
        if getattr(propose, "seeded", False):
            cands = propose(items, cfg.width, [candidate_seeds(cfg, p.id, len(pre)) for p, pre in zip(probs, prefixes)])
        else:
            cands = propose(items, cfg.width)
        for st, c in zip(active, cands):
            if c is None:
                st["done"] = True
                st["rows"].append(too_long_row(st["problem"], st["path"]))
        keep = [i for i, c in enumerate(cands) if c is not None]
        active, probs, prefixes, cands = ([x[i] for i in keep] for x in (active, probs, prefixes, cands))
        if not active:
            continue
        labels, shares, pairs = annotate_fn(probs, prefixes, cands)
        for s, prefix, c, lab, share, pr in zip(active, prefixes, cands, labels, shares, pairs):
            p = s["problem"]
            s["rows"].append(step_row(p, prefix, c, lab, share, pr))
            s["done"] = not advance(s["path"], p, c, lab, pr, cfg, rng or step_rng(cfg, p.id, len(prefix)))
    return [r for s in states for r in s["rows"]]


# ---------------------------------------------------------------------------------------------
# The in-flight driver (issue 30)
# ---------------------------------------------------------------------------------------------
@dataclass
class EFTProblem:
    """One problem in flight: ``candidates`` (wants its step's ``width`` candidates) -> ``rollouts`` (annotator
    rollout: wants its candidates' rollouts) -> ``advance`` -> ``candidates`` ... -> ``done``."""

    problem: object
    unit: object
    path: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # its step rows so far
    phase: str = "candidates"
    ready_at: int = 0  # when it entered its phase (HF serves the longest-waiting first)
    prompt: str = ""  # its next step's prompt
    cands: list = field(default_factory=list)
    got: int = 0  # candidates back so far
    completions: dict = field(default_factory=dict)  # candidate i -> its rollouts (None: no room)
    unsent: list = field(default_factory=list)  # HF: candidates whose rollouts are not asked for yet
    missing: int = 0  # rollouts not back yet


class InflightEFT:
    """build-eft's search with every problem in flight. ``run(units)`` searches every ``(unit, problems)`` the
    source yields, keeping up to ``cfg.inflight`` problems in flight, and hands ``on_unit(unit, rows)`` a unit's
    step rows (problem by problem, as ``search_chunk`` returns them) once all its problems are done.

    - vLLM: every request goes into the engine as soon as its problem is ready for it (``n=1`` requests, each
      with its own seed), and each engine step's finished requests move their problems on.
    - HF: ``generate`` is synchronous, so each round batches what is ready: the next ``batch_size`` candidate
      sequences, then the next ``batch_size`` rollouts, from the problems waiting longest (each row sampled
      from its own seeded generator, ``psr.generation.PerRowSampler``).
    """

    def __init__(self, model, tokenizer, task: Task, cfg: BuildEFTConfig, on_unit=None, progress=None):
        if cfg.annotator == "model":
            raise ValueError("the in-flight driver annotates with exact or rollout; annotator model runs lockstep")
        self.model, self.tok, self.task, self.cfg = model, tokenizer, task, cfg
        self.on_unit = on_unit or (lambda unit, rows: None)
        self.on_vllm = getattr(model, "is_vllm_engine", False)
        self.pool = InFlight(cfg.inflight, progress)
        self.live = self.pool.live  # the pool's list: the loops below read it
        self.routes: dict = {}  # vLLM request id -> (problem, "c" or "r", key)
        self.stats = {"candidate_requests": 0, "rollout_requests": 0}

    def _tick(self) -> int:
        return self.pool.tick()

    # -- units -----------------------------------------------------------------------------------------
    def _refill(self, source) -> None:
        self.pool.refill(source, EFTProblem, self._want_candidates)

    def _finish(self, ps: EFTProblem) -> None:
        members = self.pool.finish(ps)
        if members is not None:
            self.on_unit(ps.unit, [r for m in members for r in m.rows])

    # -- one problem's transitions -----------------------------------------------------------------------
    def _want_candidates(self, ps: EFTProblem) -> None:
        cfg = self.cfg
        prompt = render_prompt(self.tok, ps.problem.question, ps.path)
        if not fits(self.model, self.tok, [prompt], cfg.max_step_tokens)[0]:
            ps.rows.append(too_long_row(ps.problem, ps.path))
            self._finish(ps)
            return
        ps.phase, ps.ready_at, ps.cands, ps.got = "candidates", self._tick(), [None] * cfg.width, 0
        ps.prompt = prompt
        if self.on_vllm:
            for k, seed in enumerate(candidate_seeds(cfg, ps.problem.id, len(ps.path))):
                params = self.model.sample_params(cfg.sampling, cfg.max_step_tokens, seed, "step")
                self._send(ps, "c", k, prompt, params)

    def _got_candidates(self, ps: EFTProblem) -> None:
        if self.cfg.annotator == "exact":
            labels = [self.task.check_step(ps.problem, ps.path, c) for c in ps.cands]
            self._annotated(ps, labels, None)
            return
        cfg, q = self.cfg, ps.problem.question
        ps.completions, ps.unsent, ps.missing = {}, [], 0
        for i, c in enumerate(ps.cands):
            if not needs_rollouts(c):
                continue
            prompt = render_prompt(self.tok, q, ps.path + [c])
            if not fits(self.model, self.tok, [prompt], cfg.rollout_max_new_tokens)[0]:
                ps.completions[i] = None  # no room for a rollout: unsure (psr.lengths)
                continue
            ps.completions[i] = [None] * cfg.rollouts
            ps.missing += cfg.rollouts
            if not self.on_vllm:
                ps.unsent.append(i)  # the HF loop batches them
                continue
            for r, seed in enumerate(rollout_seeds(cfg, ps.problem.id, len(ps.path), i)):
                params = self.model.sample_params(ROLLOUT_SAMPLING, cfg.rollout_max_new_tokens, seed, "answer")
                self._send(ps, "r", (i, r), prompt, params)
        if not ps.missing:
            self._got_rollouts(ps)
            return
        ps.phase, ps.ready_at = "rollouts", self._tick()

    def _got_rollouts(self, ps: EFTProblem) -> None:
        shares = rollout_shares(self.task, ps.problem, ps.path, ps.cands, ps.completions)
        self._annotated(ps, share_labels(shares, self.cfg.right_threshold), shares)

    def _annotated(self, ps: EFTProblem, labels, shares) -> None:
        pairs = right_wrong_pairs(labels)
        step = len(ps.path)
        ps.rows.append(step_row(ps.problem, ps.path, list(ps.cands), labels, shares, pairs))
        if advance(ps.path, ps.problem, ps.cands, labels, pairs, self.cfg, step_rng(self.cfg, ps.problem.id, step)):
            self._want_candidates(ps)
        else:
            self._finish(ps)

    # -- vLLM: a request queue kept full ------------------------------------------------------------------
    def _send(self, ps: EFTProblem, kind: str, key, prompt: str, params) -> None:
        rid = f"{kind}|{self._tick()}|{ps.problem.id}"  # the clock keeps ids unique (problem ids may repeat)
        self.routes[rid] = (ps, kind, key)
        self.model.add_request(rid, self.tok(prompt, add_special_tokens=False)["input_ids"], params)
        self.stats["candidate_requests" if kind == "c" else "rollout_requests"] += 1

    def _deliver(self, out) -> None:
        ps, kind, key = self.routes.pop(out.request_id)
        text = out.outputs[0].text
        if kind == "c":
            ps.cands[key] = cut_at_step_boundary(text).strip()
            ps.got += 1
            if ps.got == self.cfg.width:
                self._got_candidates(ps)
            return
        i, r = key
        ps.completions[i][r] = cut_after_answer(text).strip()
        ps.missing -= 1
        if not ps.missing:
            self._got_rollouts(ps)

    # -- the loops ----------------------------------------------------------------------------------------
    def run(self, source) -> None:
        source = iter(source)
        self._refill(source)
        while self.live:
            if self.on_vllm:
                if not self.model.has_unfinished_requests():
                    raise RuntimeError("in-flight build-eft: problems wait, but the engine has no requests")
                for out in self.model.step():
                    self._deliver(out)
            else:
                self._hf_round()
            self._refill(source)

    def _hf_round(self) -> None:
        cfg = self.cfg
        waiting = sorted((p for p in self.live if p.phase == "candidates"), key=lambda p: p.ready_at)
        batch = waiting[: max(1, cfg.batch_size // cfg.width)]
        if batch:
            outs = generate(self.model, self.tok, [p.prompt for p in batch], cfg.sampling, cfg.max_step_tokens,
                            cfg.batch_size, num_samples=cfg.width, stop_at_step=True, progress=False,
                            seeds=[candidate_seeds(cfg, p.problem.id, len(p.path)) for p in batch])
            self.stats["candidate_requests"] += cfg.width * len(batch)
            for p, cands in zip(batch, outs):
                p.cands = list(cands)
                self._got_candidates(p)
        waiting = sorted((p for p in self.live if p.phase == "rollouts"), key=lambda p: p.ready_at)
        jobs = [(p, i) for p in waiting for i in p.unsent][: max(1, cfg.batch_size // cfg.rollouts)]
        if jobs:
            prompts = [render_prompt(self.tok, p.problem.question, p.path + [p.cands[i]]) for p, i in jobs]
            outs = generate(self.model, self.tok, prompts, ROLLOUT_SAMPLING, cfg.rollout_max_new_tokens,
                            cfg.batch_size, num_samples=cfg.rollouts, stop_at_answer=True, progress=False,
                            seeds=[rollout_seeds(cfg, p.problem.id, len(p.path), i) for p, i in jobs])
            self.stats["rollout_requests"] += cfg.rollouts * len(jobs)
            for (p, i), completions in zip(jobs, outs):
                p.unsent.remove(i)
                p.completions[i] = list(completions)
                p.missing -= cfg.rollouts
                if not p.missing:
                    self._got_rollouts(p)


def search_inflight(problems, task: Task, model, tokenizer, cfg: BuildEFTConfig, unit_size: int | None = None):
    """Every problem's step rows, problem by problem (a convenience around ``InflightEFT``)."""
    unit_size = unit_size or len(problems) or 1
    units = [(u, problems[i : i + unit_size]) for u, i in enumerate(range(0, len(problems), unit_size))]
    done: dict = {}
    InflightEFT(model, tokenizer, task, cfg, on_unit=done.__setitem__).run(units)
    return [r for u, _ in units for r in done[u]]


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


def eft_rows(pairs: list[dict], cfg: BuildEFTConfig, rng: random.Random, task: Task | None = None,
             problems: dict | None = None) -> list[dict]:
    """Each pair as EFT rows (both orders, adjacent); ``task`` and ``problems`` (id -> Problem) write the
    ``recompute`` justifications."""
    rows = []
    for n, p in enumerate(pairs):
        orders = [True, False] if cfg.both_orders else [n % 2 == 0]
        for right_first in orders:
            a, b, verdict = (p["right"], p["wrong"], "A") if right_first else (p["wrong"], p["right"], "B")
            row = {"question": p["question"], "previous_steps": p["previous_steps"], "step_a": a, "step_b": b,
                   "verdict": verdict, "problem_id": p["problem_id"], "step_index": p["step_index"],
                   "ending": ending(p["right"], p["wrong"]), "annotator": cfg.annotator, "source": "search"}
            if cfg.justification and cfg.justification_kind == "recompute":
                row["justification"] = task.recompute(problems[p["problem_id"]], p["previous_steps"], {"A": a, "B": b})
            elif cfg.justification:
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
    if cfg.justification and cfg.justification_kind == "recompute" and type(task).recompute is Task.recompute:
        raise ConfigError(f"justification_kind 'recompute' needs a task that recomputes steps; {task.name!r} "
                          "cannot: use justification_kind: reason")
    # filtering and writing happen after the search, from every chunk: their settings change no chunk
    after = ("pairs_per_step", "max_pairs", "both_orders", "justification", "justification_kind")
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
        bar = tqdm(total=sum(len(store.chunks[c]) for c in todo), desc="build-eft", unit="problem",
                   disable=not progress, dynamic_ncols=True)
        started = time.perf_counter()
        if cfg.driver == "inflight" and cfg.annotator != "model":  # chunks pulled in as room frees up
            InflightEFT(model, tokenizer, task, cfg, on_unit=store.save, progress=bar).run(
                (c, store.chunks[c]) for c in todo)
        else:
            propose = model_completer(model, tokenizer, cfg, cfg.sampling, cfg.max_step_tokens, stop_at_step=True)
            rollout = model_completer(model, tokenizer, cfg, ROLLOUT_SAMPLING, cfg.rollout_max_new_tokens,
                                      stop_at_step=False)
            annotate_fn = annotate(task, cfg, rollout, judge)
            for c in todo:
                store.save(c, search_chunk(store.chunks[c], propose, annotate_fn, cfg))
                bar.update(len(store.chunks[c]))
        bar.close()
        seconds = time.perf_counter() - started
        if own_model:
            release(model)
    steps = store.rows()
    rng = random.Random(cfg.seed)
    pairs = select_pairs(steps, cfg, rng)
    rows = eft_rows(pairs, cfg, rng, task, {p.id: p for p in problems})
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
