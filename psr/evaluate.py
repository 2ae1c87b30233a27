"""Evaluation: greedy accuracy (pass@1) and, with samples, maj@k and pass@k, per difficulty.

``psr eval --model M --task arithmetic|gsm8k|math [--data PATH] [--limit N] [--samples k]``
writes a JSON file with the summary and every problem's output.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from psr.answers import final_answer, flexible_answer, is_equivalent, majority_answer
from psr.chunks import Chunks, made_by
from psr.config import ConfigError, check_at_least
from psr.distributed import broadcast, context, device_for
from psr.engines import GenerationConfig, load_generator, loads_together, release
from psr.files import read_json, write_json_atomic
from psr.generation import cut_after_answer, generate
from psr.models import ModelOptions
from psr.sampling import SamplingConfig
from psr.steps import render_prompt, split_steps
from psr.tasks import TaskConfig, make_task


@dataclass
class EvalConfig(ModelOptions):
    """``psr eval``: greedy accuracy, and maj@k / pass@k over ``samples`` sampled solutions."""

    model: str = "smollm2-135m"  # the model: hub id, local directory, or a built-in name (smollm2-135m, tiny-random)
    task: TaskConfig = field(default_factory=TaskConfig)  # the benchmark's problems
    split: str = "test"  # arithmetic: train or test; gsm8k/math: ignored (the file is the split)
    limit: int | None = 100  # problems to evaluate (null: all)
    offset: int = 0  # skip the first problems (gsm8k/math: rows of the file, e.g. those used for training)
    batch_size: int = 32  # prompts per generate call
    max_new_tokens: int = 320  # per solution
    # stop each row once the line of its first \boxed{} answer ends: what is graded is the solution up to
    # that line with or without stopping (anything after the final answer is not part of it), so this
    # only saves the tokens a model would write after answering
    stop_at_answer: bool = True
    samples: int = 0  # k for maj@k / pass@k; 0 = greedy only
    # how the k samples are drawn (greedy accuracy is always measured too)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(policy="fixed", temperature=0.7))
    seed: int = 0  # problem selection (arithmetic) and sampling seed
    dtype: str | None = None  # float32, bfloat16, float16 or auto (null: float32 on CPU, bfloat16 on CUDA)
    out: str | None = None  # write the result JSON here
    # problems per chunk (null: batch_size): each chunk has its own seed and is the unit of sharding across
    # processes and of resume (chunks wait in <out>.parts/ until merged)
    chunk_size: int | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # the engine that solves (hf or vllm)

    def __post_init__(self):
        check_at_least(self, 1, "limit", "batch_size", "max_new_tokens")
        check_at_least(self, 0, "offset", "samples")
        if self.task.name == "arithmetic" and self.split not in ("train", "test"):
            raise ValueError(f"split must be train or test for the arithmetic task, got {self.split!r}")


def steps_right(task, problem, output: str, correct: bool) -> bool | None:
    """Whether a right answer was reached by right steps: every step passes the task's step check (psr.tasks).
    A right answer from a wrong step (say 48 + 2 = 48) is lucky, and a small model gets many; None when the
    task cannot check any of the steps (a dataset without step truth)."""
    steps = split_steps(cut_after_answer(output))
    checks = [task.check_step(problem, steps[:k], s) for k, s in enumerate(steps)]
    if all(c is None for c in checks):
        return None
    return bool(correct) and False not in checks


def _eval_chunk(cfg: EvalConfig, model, tokenizer, problems, seed: int) -> list[dict]:
    """Every problem of one chunk solved and scored: greedy, then (``samples``) k sampled solutions."""
    from psr.lengths import fits

    task = make_task(cfg.task)

    prompts = [render_prompt(tokenizer, p.question) for p in problems]
    # A problem whose prompt leaves less than max_new_tokens of the context is not solved: it counts wrong,
    # as too_long (psr.lengths). Leaving it out would raise the accuracy; sending it would end the rank on vLLM.
    ok = fits(model, tokenizer, prompts, cfg.max_new_tokens)
    sent = [q if f else "" for q, f in zip(prompts, ok)]

    def solve(sampling, k):
        outs = iter(generate(model, tokenizer, [q for q in sent if q], sampling, cfg.max_new_tokens, cfg.batch_size,
                             num_samples=k, seed=seed, progress=False, stop_at_answer=cfg.stop_at_answer))
        return [next(outs) if q else [""] * k for q in sent]

    greedy = solve(SamplingConfig(policy="greedy"), 1)
    sampled = solve(cfg.sampling, cfg.samples) if cfg.samples > 0 else None
    rows = []
    for i, (p, outs) in enumerate(zip(problems, greedy)):
        output = outs[0]
        pred = final_answer(output)  # psr's one rule: the first final answer; none is wrong
        # the lenient reading, reported beside it (flexible_accuracy), never what "correct" means
        flexible = flexible_answer(cut_after_answer(output))
        row = {"id": p.id, "question": p.question, "gold": p.gold, "output": output, "pred": pred,
               "correct": ok[i] and is_equivalent(p.gold, pred), "answered": pred is not None,
               "pred_flexible": flexible, "correct_flexible": ok[i] and is_equivalent(p.gold, flexible),
               "n_steps": len(split_steps(output)), **({} if ok[i] else {"too_long": True})}
        row["steps_right"] = steps_right(task, p, output, row["correct"])
        if sampled is not None:
            preds = [final_answer(s) for s in sampled[i]]
            maj = majority_answer(preds)
            row.update(samples=sampled[i], sample_preds=preds,
                       sample_correct=[is_equivalent(p.gold, x) for x in preds],
                       maj_pred=maj, maj_correct=is_equivalent(p.gold, maj))
        rows.append(row)
    return rows


def parts_dir(cfg: EvalConfig) -> Path | None:
    """Where the chunks of an evaluation wait to be merged: ``<out>.parts/``, with ``made_by.json`` (a changed
    config or a retrained model never picks up another's chunks, see psr.chunks); None without ``out``."""
    return Path(f"{cfg.out}.parts") if cfg.out else None


def finished(out: str | None, made: dict) -> dict | None:
    """The result at ``out`` when the same config and model made it (its ``made_by``), else None."""
    if not out or not Path(out).exists():
        return None
    try:
        result = read_json(out)
    except (OSError, ValueError):
        return None
    return result if result.get("made_by") == made else None


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the evaluation and return the result dict (also written to ``cfg.out`` when set).

    Problems go in chunks of ``chunk_size``, each with its own seed. Under several processes the
    ranks take chunks round-robin, write each to ``<out>.parts/`` as it is done, and rank 0 merges
    them: the result equals a one-process run, and a killed evaluation resumes at its first unsaved
    chunk. Ranks other than 0 return ``{}``."""
    rank, world, barrier = context()
    task = make_task(cfg.task)
    problems = task.problems(cfg.split, cfg.limit, seed=cfg.seed, offset=cfg.offset)
    size = cfg.chunk_size or cfg.batch_size
    if size < 1:
        raise ConfigError(f"chunk_size must be >= 1 (or null), got {cfg.chunk_size}")
    parts = broadcast(parts_dir(cfg))  # rank 0's: every rank writes where it will look
    if world > 1 and parts is None:
        raise ConfigError("evaluation on several processes needs out (the ranks' results meet in files beside it)")
    made = made_by(asdict(cfg), cfg.model)
    # a finished evaluation of the same config and model is reused whole (a stage killed after it resumes
    # without evaluating it again)
    done = broadcast(finished(cfg.out, made) if rank == 0 else None)
    if done is not None:
        return done if rank == 0 else {}
    store = Chunks(parts or Path("."), made, problems, size, id_field="id", what="evaluation chunk")
    if parts is not None:
        store.prepare()
        mine = store.pending(rank, world)
    else:
        mine = list(range(len(store.chunks)))

    started = time.perf_counter()
    in_memory = {}
    loaded = model is None and (bool(mine) or loads_together(cfg.generation))
    if loaded:
        model, tokenizer = load_generator(cfg.model, cfg.dtype, device_for(rank), cfg.generation, options=cfg)
    if mine:
        bar = tqdm(total=sum(len(store.chunks[c]) for c in mine),
                   desc="eval" + (f" (rank {rank})" if world > 1 else ""), unit="problem", disable=not progress,
                   dynamic_ncols=True)
        for c in mine:
            rows = _eval_chunk(cfg, model, tokenizer, store.chunks[c], seed=cfg.seed * 1_000_003 + c)
            if parts is not None:
                store.save(c, rows)
            else:
                in_memory[c] = rows
            bar.update(len(store.chunks[c]))
        bar.close()
        if parts is not None:
            store.write_timing(rank, {"rank": rank, "seconds": time.perf_counter() - started,
                                      "problems": sum(len(store.chunks[c]) for c in mine)})
    device = str(model.device) if model is not None else device_for(rank)
    if loaded:
        release(model)
    barrier()
    if rank != 0:
        barrier()
        return {}
    rows = [r for c in range(len(store.chunks)) for r in (in_memory[c] if c in in_memory else store.load(c))]
    seconds = time.perf_counter() - started
    ranks = store.timings() if parts else []
    by_difficulty = defaultdict(list)
    for p, row in zip(problems, rows):
        by_difficulty[task.difficulty(p) or "all"].append(row)
    sampled = cfg.samples > 0

    def summary(group: list[dict]) -> dict:
        n = max(1, len(group))
        s = {"n": len(group), "accuracy": sum(r["correct"] for r in group) / n,
             "answered": sum(r["answered"] for r in group) / n,  # share with a final answer at all
             "flexible_accuracy": sum(r["correct_flexible"] for r in group) / n,
             "too_long": sum(bool(r.get("too_long")) for r in group)}  # counted wrong (psr.lengths)
        checked = [r.get("steps_right") for r in group]
        if any(c is not None for c in checked):  # the task checks steps: right answers by right steps only
            s["steps_right"] = sum(bool(c) for c in checked) / n
        if sampled:
            s[f"maj@{cfg.samples}"] = sum(r["maj_correct"] for r in group) / max(1, len(group))
            s[f"pass@{cfg.samples}"] = sum(any(r["sample_correct"]) for r in group) / max(1, len(group))
            s["sample_accuracy"] = sum(sum(r["sample_correct"]) for r in group) / max(1, cfg.samples * len(group))
        return s

    result = {
        "model": cfg.model, "task": cfg.task.name, "split": cfg.split,
        **summary(rows),
        "by_difficulty": {k: summary(v) for k, v in sorted(by_difficulty.items())} if len(by_difficulty) > 1 else {},
        "throughput": {"seconds": round(seconds, 2),
                       "problems_per_minute": round(60 * len(rows) / max(seconds, 1e-9), 2),
                       "batch_size": cfg.batch_size, "processes": world,
                       "ranks": [{k: round(v, 2) if k == "seconds" else v for k, v in r.items()} for r in ranks],
                       "device": device, "backend": cfg.generation.backend},
        "config": asdict(cfg),
        "made_by": made,
        "problems": rows,
    }
    if cfg.out:
        write_json_atomic(cfg.out, result)
        shutil.rmtree(parts, ignore_errors=True)
    barrier()
    return result


def format_table(result: dict) -> str:
    """A short plain-text table of the summary."""
    cols = ["accuracy"] + [k for k in ("answered", "flexible_accuracy") if k in result]
    cols += [k for k in result if k.startswith(("maj@", "pass@"))]
    cols += ["sample_accuracy"] if "sample_accuracy" in result else []
    lines = [f"{'group':<12} {'n':>5} " + " ".join(f"{c:>15}" for c in cols)]
    groups = list(result.get("by_difficulty", {}).items()) + [("all", result)]
    for name, s in groups:
        lines.append(f"{name:<12} {s['n']:>5} " + " ".join(f"{s[c]:>15.3f}" for c in cols))
    t = result["throughput"]
    lines.append(f"{t['problems_per_minute']} problems/min (batch {t['batch_size']}, {t['device']}, {t['seconds']} s)")
    return "\n".join(lines)
