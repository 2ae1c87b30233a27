"""Data generation, stage 1: step-wise search with the model as its own step judge (PSR), or the
outcome-based Self-Rewarding baseline (SRLM). Writes ``search.jsonl`` (one trace per problem).

PSR search, per problem (docs/design.md): for each step, sample ``width`` candidate next steps,
score each by its pairwise wins, emit (best, worst) as a pair and extend the path with best; when
the judge cannot separate the candidates (max score == min score), drop the last step and its
pair and try again (at most ``max_rollbacks`` times); stop at the final ``\\boxed{}`` or after
``max_steps``. Ground truth is recorded for evaluation only: it never feeds the pairs.

Problems are processed in fixed chunks; chunk ``c`` is seeded from ``(seed, c)`` and saved as
soon as it is done, so that (a) under ``accelerate launch`` ranks take chunks round-robin and the
merged result equals a single-process run, and (b) a killed search resumes at its first unsaved chunk.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from psr.chunks import Chunks, made_by
from psr.config import ConfigError, check_at_least
from psr.distributed import broadcast, context, device_for
from psr.engines import GenerationConfig, load_generator, loads_together, release
from psr.files import write_json_atomic, write_jsonl_atomic
from psr.generation import generate
from psr.inflight import make_trace, request_seed, search_units, take_step
from psr.judge import JudgeConfig, truth_comparison
from psr.models import ModelOptions
from psr.pairs import PairsConfig
from psr.sampling import SamplingConfig
from psr.self_judges import make_judge
from psr.steps import render_prompt
from psr.tasks import TaskConfig, make_task
from psr.tasks.base import Task


@dataclass
class SRLMConfig:
    samples: int = 4  # k whole solutions per problem
    max_new_tokens: int = 320
    judge_mode: Literal["logits", "generate"] = "logits"  # score from P("0".."5") or parse "Score: N"
    judge_max_new_tokens: int = 128

    def __post_init__(self):
        check_at_least(self, 2, "samples")  # a pair needs two solutions
        check_at_least(self, 1, "max_new_tokens", "judge_max_new_tokens")


@dataclass
class SearchConfig(ModelOptions):
    model: str = "smollm2-135m"
    task: TaskConfig = field(default_factory=TaskConfig)
    method: Literal["psr", "srlm"] = "psr"
    split: str = "train"
    limit: int | None = 64
    # first problem: gsm8k/math: a row of the file; arithmetic: a position in its stream of problems. In a run
    # (psr iterate), null: right after the problems init trained on; round r starts problems_per_round later
    offset: int | None = None
    data_seed: int | None = None  # arithmetic: which stream of problems (null: seed, which also seeds sampling)
    width: int = 6  # candidates per step (paper: 6)
    max_steps: int = 20  # paper: 20
    max_rollbacks: int = 3  # tie rule: how often a problem may roll back before it is given up
    # candidates that are all the same text: keep it and go on without a pair (true), or roll back as the paper's
    # tie rule does (false). Beyond the paper: a confident small model writes one step four times, and rolling back
    # resamples the step before it; a 135M search gave up on 13 of 48 problems so (results/experiment_v4/README.md)
    keep_unanimous: bool = False
    max_step_tokens: int = 96  # new tokens per candidate step
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(policy="edt"))
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    srlm: SRLMConfig = field(default_factory=SRLMConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    chunk_size: int = 8  # problems searched together (batched); also the unit of resume and sharding
    batch_size: int = 48  # sequences per generate call
    # psr: inflight = every problem of a rank in flight, each advancing on its own (psr.inflight); lockstep =
    # chunks that advance one phase at a time (search_chunk, before issue 30)
    driver: Literal["inflight", "lockstep"] = "inflight"
    inflight: int = 64  # inflight driver: problems in flight per rank (chunks are pulled in as others finish)
    seed: int = 0
    round: int = 1
    dtype: str | None = None
    out: str = "runs/search"
    # the engine behind candidates, the judge and SRLM's samples and scores (hf or vllm)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        if self.width < 2:
            raise ValueError(f"width must be >= 2 (pairs need two candidates), got {self.width}")
        check_at_least(self, 1, "chunk_size", "max_steps", "limit", "batch_size", "max_step_tokens")
        check_at_least(self, 0, "offset", "max_rollbacks")


# ---------------------------------------------------------------------------------------------
# PSR: step-wise search
# ---------------------------------------------------------------------------------------------
def model_proposer(model, tok, cfg: SearchConfig):
    """``propose([(question, steps so far), ...]) -> [[candidate step] * width, ...]``, batched."""

    def propose(items, keys=None):
        """``keys``: (problem id, step, attempt) per item: each candidate then samples under its own seed
        (``psr.inflight.request_seed``), as the in-flight driver's do. A prompt without room for a whole step
        is not sent: None, and the problem stops (psr.lengths)."""
        from psr.lengths import fits

        prompts = [render_prompt(tok, question, path) for question, path in items]
        seeds = None if keys is None else [[request_seed(cfg.seed, *key, k) for k in range(cfg.width)] for key in keys]
        ok = fits(model, tok, prompts, cfg.max_step_tokens)
        out = iter(generate(model, tok, [p for p, k in zip(prompts, ok) if k], cfg.sampling, cfg.max_step_tokens,
                            cfg.batch_size, num_samples=cfg.width, stop_at_step=True, progress=False,
                            seeds=None if seeds is None else [s for s, k in zip(seeds, ok) if k]))
        return [next(out) if k else None for k in ok]

    propose.keyed = True
    return propose


def search_chunk(problems, task, propose, judge, cfg: SearchConfig) -> list[dict]:
    """Step-wise search for a few problems in lockstep (their candidates batched together).
    ``propose`` samples candidate steps (see ``model_proposer``); ``judge.compare`` scores them
    (``judge=None``: the task's exact step check does, see ``truth_comparison``)."""
    states = [{"problem": p, "path": [], "events": [], "rollbacks": 0, "status": None} for p in problems]
    active = list(states)
    while active:
        items = [(s["problem"].question, s["path"]) for s in active]
        if getattr(propose, "keyed", False):  # per-request seeds, as the in-flight driver's
            candidates = propose(items, [(s["problem"].id, len(s["path"]), len(s["events"])) for s in active])
        else:
            candidates = propose(items)
        for s, cands in zip(active, candidates):
            if cands is None:  # the next step's prompt does not fit the context (psr.lengths): stop here
                s["status"] = "too_long"
        kept = [(s, c) for s, c in zip(active, candidates) if c is not None]
        active, candidates = [s for s, _ in kept], [c for _, c in kept]
        if not active:
            break
        correct = [[task.check_step(s["problem"], s["path"], c) for c in cands] for s, cands in zip(active, candidates)]
        if judge is None:  # judge.mode "truth": the task's step check (the oracle control arm)
            comparisons = [truth_comparison(c) for c in correct]
        else:
            comparisons = judge.compare([(s["problem"].question, s["path"], c) for s, c in zip(active, candidates)])
        active = [s for s, cands, right, comp in zip(active, candidates, correct, comparisons)
                  if take_step(s, cands, right, comp, cfg.max_rollbacks, cfg.max_steps, oracle=judge is None,
                            keep_unanimous=cfg.keep_unanimous)]
    return [make_trace(s, task, "psr") for s in states]


def context_counts(traces: list[dict]) -> dict:
    """What the length guard did in a search (psr.lengths): problems stopped because their next prompt did
    not fit, steps judged without their earliest steps, steps not judged at all, SRLM samples left unscored."""
    events = [e for t in traces for e in t.get("events", [])]
    return {"problems_too_long": sum(t.get("status") == "too_long" for t in traces),
            "judge_steps_elided": sum(bool(e.get("judge_elided_steps")) for e in events),
            "judge_too_long": sum(bool(e.get("judge_too_long")) for e in events),
            "samples_unscored_too_long": sum(t.get("too_long", 0) for t in traces)}


# ---------------------------------------------------------------------------------------------
# Driver: chunks, seeds, resume, sharding across accelerate processes
# ---------------------------------------------------------------------------------------------
def search_problems(cfg: SearchConfig, task=None) -> list:
    """The problems a search config picks: ``limit`` of them from ``offset`` (a file's rows; the built-in
    task's stream of (split, data_seed))."""
    task = task or make_task(cfg.task)
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    return task.problems(cfg.split, cfg.limit, seed=seed, offset=cfg.offset or 0)


def run_search(cfg: SearchConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Search every problem, write ``out/search.jsonl`` and ``out/pairs.jsonl``; return the pair stats."""
    from psr.pairs import build_pairs, pair_stats

    rank, world, barrier = context()
    out = Path(cfg.out)
    task = make_task(cfg.task)
    if cfg.judge.mode == "truth" and type(task).check_step is Task.check_step:
        raise ConfigError(f"search.judge.mode 'truth' needs a task that can check a step; "
                          f"task {cfg.task.name!r} cannot "
                          "(the built-in arithmetic task can)")
    problems = search_problems(cfg, task)
    # pairs are built from the merged traces, and the round only labels them: neither changes a chunk
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("pairs", "round")}
    store = Chunks(out / "search_chunks", made_by(settings, cfg.model), problems, cfg.chunk_size, what="search chunk")
    store.prepare()
    chunks, chunk_dir = store.chunks, store.root
    # the in-flight driver queues the judge's requests itself (the paper's logits/generate judges, the likelihood's
    # prompt log-probabilities); consistency's rollouts score whole steps through compare(), in the lockstep driver
    inflight = cfg.method == "psr" and cfg.driver == "inflight" and cfg.judge.mode != "consistency"
    if inflight:  # ranks take chunks as they go (psr.inflight.claimed_units), not round-robin up front
        nonce = broadcast(uuid.uuid4().hex if rank == 0 else None)
        mine = [c for c in range(len(chunks)) if not store.saved(c)]
    else:
        mine = store.pending(rank, world)

    if mine or (model is None and loads_together(cfg.generation)):
        loaded = model is None
        if loaded:
            model, tokenizer = load_generator(cfg.model, cfg.dtype, device_for(rank), cfg.generation, options=cfg)
        judge = make_judge(model, tokenizer, cfg.judge) if cfg.method == "psr" else None
        started = time.perf_counter()
        bar = tqdm(total=sum(len(store.chunks[c]) for c in mine), desc=f"{cfg.method} search (rank {rank})",
                   unit="problem", disable=not progress, dynamic_ncols=True)
        if inflight:
            mine = search_units(model, tokenizer, task, judge, cfg, chunks, mine, chunk_dir, nonce, world, bar)
        for c in ([] if inflight else mine):
            torch.manual_seed(cfg.seed * 1_000_003 + c)  # per-chunk seed: same result whatever the sharding
            if cfg.method == "psr":
                traces = search_chunk(store.chunks[c], task, model_proposer(model, tokenizer, cfg), judge, cfg)
            else:
                from psr.srlm import srlm_chunk

                traces = srlm_chunk(store.chunks[c], task, model, tokenizer, cfg)
            store.save(c, traces)
            bar.update(len(store.chunks[c]))
        bar.close()
        if loaded:
            release(model)
        if mine:  # a rank that only loaded its engine alongside the others keeps an earlier run's timing
            store.write_timing(rank, {"seconds": time.perf_counter() - started})
    barrier()
    if rank != 0:
        barrier()
        return {}
    if inflight:
        shutil.rmtree(chunk_dir / f"claims.{nonce}", ignore_errors=True)
    traces = store.rows()
    write_jsonl_atomic(out / "search.jsonl", traces)
    if tokenizer is None:
        from psr.models import load_tokenizer, model_options

        tokenizer = load_tokenizer(cfg.model, model_options(cfg))
    pairs = build_pairs(traces, tokenizer, cfg.pairs, round_index=cfg.round)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    stats = pair_stats(traces, pairs)
    stats["context"] = context_counts(traces)
    stats["config"] = asdict(cfg)
    write_json_atomic(out / "pair_stats.json", stats)
    barrier()
    return stats
