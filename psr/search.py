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

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from psr.answers import extract_answer
from psr.config import ConfigError, check_at_least
from psr.distributed import context, device_for
from psr.engines import GenerationConfig, load_generator, loads_together, release
from psr.files import DataError, read_jsonl, write_jsonl_atomic
from psr.generation import generate
from psr.judge import JudgeConfig, StepJudge, truth_comparison
from psr.pairs import PairsConfig
from psr.sampling import SamplingConfig
from psr.steps import has_final_answer, render_prompt
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
class SearchConfig:
    model: str = "smollm2-135m"
    task: TaskConfig = field(default_factory=TaskConfig)
    method: Literal["psr", "srlm"] = "psr"
    split: str = "train"
    limit: int | None = 64
    offset: int = 0  # gsm8k/math: first row to use
    width: int = 6  # candidates per step (paper: 6)
    max_steps: int = 20  # paper: 20
    max_rollbacks: int = 3  # tie rule: how often a problem may roll back before it is given up
    max_step_tokens: int = 96  # new tokens per candidate step
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(policy="edt"))
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    srlm: SRLMConfig = field(default_factory=SRLMConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    chunk_size: int = 8  # problems searched together (batched); also the unit of resume and sharding
    batch_size: int = 48  # sequences per generate call
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

    def propose(items):
        from psr.lengths import fits

        prompts = [render_prompt(tok, question, path) for question, path in items]
        # a prompt without room for a whole step is not sent: None, and the problem stops (psr.lengths)
        ok = fits(model, tok, prompts, cfg.max_step_tokens)
        out = iter(generate(model, tok, [p for p, k in zip(prompts, ok) if k], cfg.sampling, cfg.max_step_tokens,
                            cfg.batch_size, num_samples=cfg.width, stop_at_step=True, progress=False))
        return [next(out) if k else None for k in ok]

    return propose


def search_chunk(problems, task, propose, judge, cfg: SearchConfig) -> list[dict]:
    """Step-wise search for a few problems in lockstep (their candidates batched together).
    ``propose`` samples candidate steps (see ``model_proposer``); ``judge.compare`` scores them
    (``judge=None``: the task's exact step check does, see ``truth_comparison``)."""
    states = [{"problem": p, "path": [], "events": [], "rollbacks": 0, "status": None} for p in problems]
    active = list(states)
    while active:
        candidates = propose([(s["problem"].question, s["path"]) for s in active])
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
        still = []
        for s, cands, right, comp in zip(active, candidates, correct, comparisons):
            event = {
                "step_index": len(s["path"]), "previous_steps": list(s["path"]), "candidates": cands,
                "candidate_correct": right, "judgments": comp.order_scores, "scores": comp.scores,
                "order_disagreements": comp.disagreements, "unparseable": comp.unparseable,
                **({"judge_elided_steps": comp.elided} if comp.elided else {}),
                **({"judge_too_long": True} if comp.too_long else {}),
            }
            s["events"].append(event)
            if judge is None and all(r is True for r in right):
                # Oracle, every candidate right: any will do. Keep the first, learn nothing (no worst,
                # no pair); the tie rule below is for a judge that cannot tell right from wrong.
                best, worst = 0, None
            elif max(comp.scores) == min(comp.scores):  # the judge cannot separate them: roll back
                event["tie"] = True
                s["rollbacks"] += 1
                if s["rollbacks"] > cfg.max_rollbacks:
                    s["status"] = "gave_up"  # stop here; the steps kept so far (and their pairs) stand
                    continue
                if s["path"]:
                    s["path"].pop()
                    kept = [e for e in s["events"] if e.get("kept")]
                    kept[-1]["kept"] = False
                    kept[-1]["rolled_back"] = True
                still.append(s)
                continue
            else:
                best = max(range(len(cands)), key=lambda i: (comp.scores[i], -i))
                worst = min(range(len(cands)), key=lambda i: (comp.scores[i], i))
            event.update(tie=False, best=best, worst=worst, kept=True)
            s["path"].append(cands[best])
            if has_final_answer(cands[best]):
                s["status"] = "answered"
            elif not cands[best].strip():
                s["status"] = "empty_step"
            elif len(s["path"]) >= cfg.max_steps:
                s["status"] = "max_steps"
            else:
                still.append(s)
        active = still
    return [_trace(s, task, "psr") for s in states]


def _trace(s: dict, task, method: str) -> dict:
    p = s["problem"]
    solution = "\n".join(s["path"])
    return {
        "problem_id": p.id, "question": p.question, "gold": p.gold, "method": method,
        "difficulty": task.difficulty(p), "status": s["status"], "rollbacks": s["rollbacks"],
        "path": s["path"], "final_answer": extract_answer(solution) if s["path"] else None,
        "final_correct": bool(s["path"]) and task.check_answer(p, solution),
        "events": s["events"],
    }


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
def _read_chunk(path: Path, problems) -> list[dict]:
    """A saved chunk's traces, checked: every line parses and the chunk holds exactly its problems,
    in order (a copy cut short is not merged as is). Raises :class:`DataError` naming the file."""
    traces = read_jsonl(path)
    got, want = [t.get("problem_id") for t in traces], [p.id for p in problems]
    if got != want:
        missing = [i for i in want if i not in got]
        raise DataError(f"{path}: holds {len(got)} of the chunk's {len(want)} problems"
                        + (f" (missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})" if missing
                           else " (not the chunk's problems)"))
    return traces


def _saved_chunk_ok(chunk_dir: Path, c: int, problems) -> bool:
    """Is chunk ``c`` saved and whole? A damaged one is named, deleted and searched again."""
    path = chunk_dir / f"{c:05d}.jsonl"
    if not path.exists():
        return False
    try:
        _read_chunk(path, problems)
        return True
    except DataError as err:
        print(f"warning: {err}; searching this chunk again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return False


def run_search(cfg: SearchConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Search every problem, write ``out/search.jsonl`` and ``out/pairs.jsonl``; return the pair stats."""
    from psr.pairs import build_pairs, pair_stats

    rank, world, barrier = context()
    out = Path(cfg.out)
    chunk_dir = out / "search_chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    task = make_task(cfg.task)
    if cfg.judge.mode == "truth" and type(task).check_step is Task.check_step:
        raise ConfigError(f"search.judge.mode 'truth' needs a task that can check a step; "
                          f"task {cfg.task.name!r} cannot "
                          "(the built-in arithmetic task can)")
    kwargs = {"offset": cfg.offset} if cfg.task.name != "arithmetic" else {}
    problems = task.problems(cfg.split, cfg.limit, seed=cfg.seed, **kwargs)
    chunks = [problems[i : i + cfg.chunk_size] for i in range(0, len(problems), cfg.chunk_size)]
    mine = [c for c in range(len(chunks)) if c % world == rank and not _saved_chunk_ok(chunk_dir, c, chunks[c])]

    if mine or (model is None and loads_together(cfg.generation)):
        loaded = model is None
        if loaded:
            model, tokenizer = load_generator(cfg.model, cfg.dtype, device_for(rank), cfg.generation)
        judge = StepJudge(model, tokenizer, cfg.judge) if cfg.method == "psr" and cfg.judge.mode != "truth" else None
        started = time.perf_counter()
        bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc=f"{cfg.method} search (rank {rank})",
                   unit="problem", disable=not progress, dynamic_ncols=True)
        for c in mine:
            torch.manual_seed(cfg.seed * 1_000_003 + c)  # per-chunk seed: same result whatever the sharding
            if cfg.method == "psr":
                traces = search_chunk(chunks[c], task, model_proposer(model, tokenizer, cfg), judge, cfg)
            else:
                from psr.srlm import srlm_chunk

                traces = srlm_chunk(chunks[c], task, model, tokenizer, cfg)
            write_jsonl_atomic(chunk_dir / f"{c:05d}.jsonl", traces)
            bar.update(len(chunks[c]))
        bar.close()
        if loaded:
            release(model)
        if mine:  # a rank that only loaded its engine alongside the others keeps an earlier run's timing
            (chunk_dir / f"timing.rank{rank}.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    barrier()
    if rank != 0:
        barrier()
        return {}
    traces = [t for c in range(len(chunks)) for t in _read_chunk(chunk_dir / f"{c:05d}.jsonl", chunks[c])]
    write_jsonl_atomic(out / "search.jsonl", traces)
    if tokenizer is None:
        from psr.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    pairs = build_pairs(traces, tokenizer, cfg.pairs, round_index=cfg.round)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    stats = pair_stats(traces, pairs)
    stats["context"] = context_counts(traces)
    stats["config"] = asdict(cfg)
    (out / "pair_stats.json").write_text(json.dumps(stats, indent=2))
    barrier()
    return stats
