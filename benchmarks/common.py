"""Small helpers shared by the benchmarks: diversity metrics (distinct-n, self-BLEU), step-level
quality on the arithmetic task, and summary statistics."""

from __future__ import annotations

import math
import statistics
from collections import Counter

from psr.steps import split_steps


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over ``texts`` (whitespace tokens); 0 when there are none."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sentence_bleu(hyp: list[str], refs: list[list[str]], max_n: int = 4) -> float:
    """BLEU-``max_n`` of one tokenised hypothesis against several references: clipped n-gram
    precisions (+1 smoothing for n > 1, Lin & Och 2004), geometric mean, brevity penalty
    against the reference closest in length."""
    if not hyp or not refs:
        return float(bool(refs) and any(not r for r in refs))  # empty vs an empty reference: identical
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hyp, n))
        best = Counter()
        for r in refs:
            best |= Counter(ngrams(r, n))
        match, total = sum(min(c, best[g]) for g, c in counts.items()), sum(counts.values())
        if n == 1 and match == 0:
            return 0.0
        log_p += math.log(match / total if n == 1 else (match + 1) / (total + 1)) / max_n
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    brevity = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return brevity * math.exp(log_p)


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each text against the others (1 = all the same; lower = more diverse)."""
    toks = [t.split() for t in texts]
    if len(toks) < 2:
        return 1.0
    return statistics.fmean(sentence_bleu(h, toks[:i] + toks[i + 1 :], max_n) for i, h in enumerate(toks))


def correct_prefix_fraction(task, problem, solution: str) -> float:
    """Share of the problem's known steps that ``solution`` gets right, in order, before its first
    wrong step (steps the task cannot check, e.g. prose without an equation, are skipped)."""
    right: list[str] = []
    for step in split_steps(solution):
        ok = task.check_step(problem, right, step)
        if ok is False:
            break
        if ok:
            right.append(step)
    return min(1.0, len(right) / len(problem.meta["chain"]))


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def vllm_missing(script: str) -> bool:
    """True (and says where to run it) when vLLM is not importable: `make bench` runs every benchmark from .venv."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print(f"{script}: vLLM is not installed here; run it with `make bench-vllm`")
        return True
    return False
