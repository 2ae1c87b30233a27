"""Evaluation: greedy accuracy (pass@1) and, with samples, maj@k and pass@k, per difficulty.

``psr eval --model M --task arithmetic|gsm8k|math [--data PATH] [--limit N] [--samples k]``
writes a JSON file with the summary and every problem's output.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from psr.answers import extract_answer, is_equivalent
from psr.config import check_at_least
from psr.files import write_json_atomic
from psr.generation import cut_after_answer, generate
from psr.sampling import SamplingConfig
from psr.steps import render_prompt, split_steps
from psr.tasks import TaskConfig, make_task


@dataclass
class EvalConfig:
    """``psr eval``: greedy accuracy, and maj@k / pass@k over ``samples`` sampled solutions."""

    model: str = "smollm2-135m"  # the model: hub id, local directory, or a built-in name (smollm2-135m, tiny-random)
    task: TaskConfig = field(default_factory=TaskConfig)  # the benchmark's problems
    split: str = "test"  # arithmetic: train or test; gsm8k/math: ignored (the file is the split)
    limit: int | None = 100  # problems to evaluate (null: all)
    offset: int = 0  # gsm8k/math: skip the first rows (e.g. those used for training)
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

    def __post_init__(self):
        check_at_least(self, 1, "limit", "batch_size", "max_new_tokens")
        check_at_least(self, 0, "offset", "samples")
        if self.task.name == "arithmetic" and self.split not in ("train", "test"):
            raise ValueError(f"split must be train or test for the arithmetic task, got {self.split!r}")


def _majority(answers: list[str | None]) -> str | None:
    """The most common answer, grouping answers that math-verify calls equivalent."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if g[0] == a or is_equivalent(g[0], a):
                g.append(a)
                break
        else:
            groups.append([a])
    return max(groups, key=len)[0] if groups else None


def evaluate(cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Run the evaluation and return the result dict (also written to ``cfg.out`` when set)."""
    from psr.models import load_model

    task = make_task(cfg.task)
    kwargs = {"offset": cfg.offset} if cfg.task.name != "arithmetic" else {}
    problems = task.problems(cfg.split, cfg.limit, seed=cfg.seed, **kwargs)  # a bad data file fails before the model
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    prompts = [render_prompt(tokenizer, p.question) for p in problems]

    started = time.perf_counter()
    greedy = generate(model, tokenizer, prompts, SamplingConfig(policy="greedy"), cfg.max_new_tokens,
                      cfg.batch_size, seed=cfg.seed, desc="eval greedy", progress=progress,
                      stop_at_answer=cfg.stop_at_answer)
    sampled = None
    if cfg.samples > 0:
        sampled = generate(model, tokenizer, prompts, cfg.sampling, cfg.max_new_tokens, cfg.batch_size,
                           num_samples=cfg.samples, seed=cfg.seed, desc=f"eval {cfg.samples} samples",
                           progress=progress, stop_at_answer=cfg.stop_at_answer)
    seconds = time.perf_counter() - started

    rows, by_difficulty = [], defaultdict(list)
    for i, (p, outs) in enumerate(zip(problems, greedy)):
        output = outs[0]
        pred = extract_answer(cut_after_answer(output))
        row = {"id": p.id, "question": p.question, "gold": p.gold, "output": output, "pred": pred,
               "correct": is_equivalent(p.gold, pred), "n_steps": len(split_steps(output))}
        if sampled is not None:
            preds = [extract_answer(cut_after_answer(s)) for s in sampled[i]]
            maj = _majority(preds)
            row.update(samples=sampled[i], sample_preds=preds,
                       sample_correct=[is_equivalent(p.gold, x) for x in preds],
                       maj_pred=maj, maj_correct=is_equivalent(p.gold, maj))
        rows.append(row)
        by_difficulty[task.difficulty(p) or "all"].append(row)

    def summary(group: list[dict]) -> dict:
        s = {"n": len(group), "accuracy": sum(r["correct"] for r in group) / max(1, len(group))}
        if sampled is not None:
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
                       "batch_size": cfg.batch_size, "device": str(model.device)},
        "config": asdict(cfg),
        "problems": rows,
    }
    if cfg.out:
        write_json_atomic(cfg.out, result)
    return result


def format_table(result: dict) -> str:
    """A short plain-text table of the summary."""
    cols = ["accuracy"] + [k for k in result if k.startswith(("maj@", "pass@"))]
    cols += ["sample_accuracy"] if "sample_accuracy" in result else []
    lines = [f"{'group':<12} {'n':>5} " + " ".join(f"{c:>15}" for c in cols)]
    groups = list(result.get("by_difficulty", {}).items()) + [("all", result)]
    for name, s in groups:
        lines.append(f"{name:<12} {s['n']:>5} " + " ".join(f"{s[c]:>15.3f}" for c in cols))
    t = result["throughput"]
    lines.append(f"{t['problems_per_minute']} problems/min (batch {t['batch_size']}, {t['device']}, {t['seconds']} s)")
    return "\n".join(lines)
