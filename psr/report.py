"""``psr report runs/NAME``: report.md and PNG plots of a run, from its stage artifacts alone.

Plots: accuracy per model per benchmark with 95% Wilson intervals (PSR, SRLM and the oracle arm on the
same axes; maj@k, pass@k and the test-time search beside greedy when the run measured them), the
judge's accuracy and order agreement per model, pairs per round and how often chosen steps are right
and rejected steps wrong, steps per solution and mean step length (paper Table 4), DPO loss and
reward-margin curves.

Significance: every model is compared with M1 (M1 with M0) on the same problems, paired by problem;
the table gives each comparison's z and two-sided p, and Holm's correction over all the comparisons of
the report decides which differences are called significant (family-wise 5%). Each arm is one training
run: the intervals cover which problems were drawn, not the spread between training runs (seeds).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from psr.files import DataError, read_json, read_jsonl, write_jsonl_atomic, write_text_atomic  # noqa: E402
from psr.pairs import ending_pairs, judge_in_search, truth_mix  # noqa: E402
from psr.steps import has_final_answer  # noqa: E402


def _load(path: Path) -> dict | None:
    """A stage's JSON artifact, None when the stage has not written it; a damaged one is a
    :class:`DataError` naming it (``psr iterate`` on the run checks its stages and redoes that one)."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except DataError as err:
        raise DataError(f"{err}; run psr iterate on the run again to redo its stage") from err


def benchmark_problems(run_dir: Path, name: str) -> tuple | None:
    """The task of a run's benchmark ``name`` and its held-out problems by id, read from the run's config.yaml
    (the full config psr iterate stored; read as data, since psr.rounds imports this module): the step truth an
    eval row does not carry. None when the run has no such config or benchmark."""
    import dataclasses

    from psr.config import ConfigError, from_dict, load_yaml
    from psr.evaluate import EvalConfig
    from psr.tasks import make_task

    if not (run_dir / "config.yaml").exists():
        return None
    try:  # a report never fails for want of it: a moved data file or an old config just leaves the column out
        cfg = load_yaml(run_dir / "config.yaml")
        b = next((b for b in cfg.get("benchmarks") or [] if isinstance(b, dict) and b.get("name") == name), None)
        if b is None:
            return None
        # the benchmark's psr eval settings with EvalConfig's defaults; its seed falls back to the run's, as in
        # psr.rounds.BenchmarkConfig.eval_config
        fields = {f.name for f in dataclasses.fields(EvalConfig)} - {"model", "out", "seed"}
        e = from_dict(EvalConfig, {k: v for k, v in b.items() if k in fields})
        seed = cfg.get("seed", 0) if b.get("seed") is None else b["seed"]
        task = make_task(e.task)
        problems = task.problems(e.split, e.limit, seed=seed, offset=e.offset)
        return task, {p.id: p for p in problems}
    except (ConfigError, DataError, OSError, ValueError, TypeError, AttributeError):
        return None


def _load_eval(d: Path, truth=None) -> dict | None:
    """A model's eval.json, each benchmark with the share of its solutions that give a final answer
    (``answered``, as the evaluation recorded it; runs older than that field count it from
    eval_<name>.json's outputs): a model that stops answering shows here first. Older runs get ``steps_right``
    the same way, checked against ``truth(name)`` (``benchmark_problems``) where the task checks steps."""
    from psr.evaluate import steps_right

    e = _load(d / "eval.json")
    for name, b in ((e or {}).get("benchmarks") or {}).items():
        if b.get("answered") is not None and ("steps_right" in b or truth is None):
            continue
        rows = (_load(d / f"eval_{name}.json") or {}).get("problems")
        if not rows:
            continue
        if b.get("answered") is None:
            b["answered"] = sum(has_final_answer(r["output"]) for r in rows) / len(rows)
            b.setdefault("n", len(rows))
        known = truth(name) if truth is not None and "steps_right" not in b else None
        if known is not None:
            task, problems = known
            checked = [steps_right(task, problems[r["id"]], r["output"], r["correct"]) if r["id"] in problems
                       and problems[r["id"]].question == r["question"] else None for r in rows]
            if any(c is not None for c in checked):
                b["steps_right"] = sum(bool(c) for c in checked) / len(rows)
    return e


def wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1], sensible at 0 and 1)."""
    if not n:
        return (0.0, 1.0)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (0.0 if share <= 0 else max(0.0, centre - half), 1.0 if share >= 1 else min(1.0, centre + half))


def two_sided_p(z: float) -> float:
    """Two-sided p-value of a standard normal z."""
    return math.erfc(abs(z) / math.sqrt(2))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): reject where adjusted p < alpha
    controls the family-wise error rate at alpha over all the comparisons."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# Per benchmark, the measures beside greedy accuracy that an eval may hold (maj@k, pass@k with
# `samples`, the step-wise search at inference with `test_time_search`), in the order shown.
def _extra_measures(e: dict, bench: str) -> list[str]:
    b = (e.get("benchmarks") or {}).get(bench) or {}
    keys = sorted(k for k in b if k.startswith(("maj@", "pass@")))
    return keys + (["test_time_search_accuracy"] if b.get("test_time_search_accuracy") is not None else [])


_SHORT = {"test_time_search_accuracy": "test-time search"}


def collect(run_dir: str | Path) -> dict:
    """Per method, the chain of models M0, M1, M2, ... with their eval, pairs and training logs."""
    run_dir = Path(run_dir)
    known = {}

    def truth(name):  # each benchmark's problems, built once, only for evals older than steps_right
        if name not in known:
            known[name] = benchmark_problems(run_dir, name)
        return known[name]

    m0, m1 = _load_eval(run_dir / "m0", truth), _load_eval(run_dir / "init", truth)
    methods = {}
    for method in ("psr", "srlm", "oracle"):
        rounds = sorted((run_dir / method).glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
        if not rounds:
            continue
        chain = []
        for d in rounds:
            train_log = _load(d / "model" / "train_log.json")
            pairs = _load(d / "pair_stats.json")
            # older runs counted kept steps only
            stale = pairs is not None and "ties" not in (pairs.get("judge_in_search") or {})
            if stale and (d / "search.jsonl").exists():
                pairs["judge_in_search"] = judge_in_search(read_jsonl(d / "search.jsonl"))
            if pairs is not None and "endings" not in pairs and (d / "pairs.jsonl").exists():
                pairs["endings"] = ending_pairs(read_jsonl(d / "pairs.jsonl"))
            if pairs and pairs.get("truth") and "mix" not in pairs["truth"] and (d / "pairs.jsonl").exists():
                pairs["truth"]["mix"] = truth_mix(read_jsonl(d / "pairs.jsonl"))
            chain.append({"round": int(d.name.split("_")[1]), "eval": _load_eval(d, truth),
                          "pairs": pairs, "train_log": train_log})
        methods[method] = chain
    given = (_load(run_dir / "init" / "init.done") or {}).get("given")
    return {"m0": m0, "m1": m1, "m1_given": bool(given), "methods": methods}


def _points(data: dict, method: str | None):
    """(label, eval) along the chain M0, M1, M2, ... for a method (None: just M0 and M1)."""
    pts = [("M0", data["m0"]), ("M1", data["m1"])]
    for r in data["methods"].get(method, []) if method else []:
        pts.append((f"M{r['round'] + 1}", r["eval"]))
    return [(label, e) for label, e in pts if e]


def _benchmarks(data: dict) -> list[str]:
    names = []
    for _, e in _points(data, None) + [p for m in data["methods"] for p in _points(data, m)]:
        names += [n for n in e.get("benchmarks", {}) if n not in names]
    return names


def _plot_lines(ax, data, value, ylabel, title, share=False, n_of=None):
    """One line per method and series over the models M0, M1, M2, ... (x = the model's index, integer
    ticks). ``share``: a rate, drawn within [0, 1]; ``n_of(e, series)`` gives the sample size behind a
    point, which draws its 95% Wilson interval."""
    methods = list(data["methods"]) or [None]
    longest = 0
    for k, method in enumerate(methods):
        for series, fn in value.items():
            pts = [(int(label[1:]), fn(e), (n_of(e, series) if n_of else None)) for label, e in _points(data, method)]
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            longest = max(longest, max(p[0] for p in pts))
            # methods share M0 and M1: shift each a little so that overlapping intervals stay readable
            xs = [p[0] + 0.06 * (k - (len(methods) - 1) / 2) for p in pts]
            ys = [p[1] for p in pts]
            style = dict(marker="o", label=f"{method.upper() + ' ' if method else ''}{series}",
                         linestyle={None: "-", "psr": "-", "srlm": "--"}.get(method, ":"))
            if n_of and all(p[2] for p in pts):
                lo_hi = [wilson(y, n) for y, (_, _, n) in zip(ys, pts)]
                err = [[y - lo for y, (lo, _) in zip(ys, lo_hi)], [hi - y for y, (_, hi) in zip(ys, lo_hi)]]
                ax.errorbar(xs, ys, yerr=err, capsize=3, **style)
            else:
                ax.plot(xs, ys, **style)
    ax.set_xticks(range(longest + 1), [f"M{i}" for i in range(longest + 1)])
    ax.set_xlabel("model (M0 base, M1 after init, M(r+1) after round r)")
    if share:
        ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_plots(run_dir: Path, data: dict) -> list[str]:
    files = []
    bench = _benchmarks(data)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    series = {}
    for b in bench:
        series[b] = (b, "accuracy")
        extras = []
        for _, e in _points(data, None) + [p for m in data["methods"] for p in _points(data, m)]:
            extras += [k for k in _extra_measures(e, b) if k not in extras]
        series.update({f"{b} {_SHORT.get(k, k)}": (b, k) for k in extras})
    _plot_lines(ax, data, {name: (lambda e, b=b, k=k: e.get("benchmarks", {}).get(b, {}).get(k))
                           for name, (b, k) in series.items()},
                "accuracy (greedy pass@1 unless named)", "Held-out accuracy per model (95% Wilson intervals)",
                share=True, n_of=lambda e, name: (e.get("benchmarks", {}).get(series[name][0]) or {}).get("n"))
    files.append(_save(fig, run_dir / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    _plot_lines(ax, data, {"judge accuracy": lambda e: (e.get("judge") or {}).get("accuracy"),
                           "order agreement": lambda e: (e.get("judge") or {}).get("order_agreement")},
                "rate", "Step judge on held-out pairs", share=True)
    files.append(_save(fig, run_dir / "judge.png"))

    if data["methods"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / len(data["methods"])
        for k, (method, chain) in enumerate(data["methods"].items()):
            rounds = [c["round"] for c in chain if c["pairs"]]
            a1.bar([r + k * width for r in rounds], [c["pairs"]["pairs"] for c in chain if c["pairs"]], width,
                   label=method.upper())
            truth = [(c["round"], c["pairs"].get("truth")) for c in chain if c["pairs"] and c["pairs"].get("truth")]
            if truth:
                a2.plot([r for r, _ in truth], [t["chosen_right"] for _, t in truth], marker="o",
                        label=f"{method.upper()} chosen right")
                a2.plot([r for r, _ in truth], [t["rejected_wrong"] for _, t in truth], marker="s", linestyle="--",
                        label=f"{method.upper()} rejected wrong")
        last = max(c["round"] for chain in data["methods"].values() for c in chain)
        for a in (a1, a2):
            a.set_xticks(range(1, last + 1))
        a1.set(xlabel="round", ylabel="pairs", title="Preference pairs per round")
        a1.legend(fontsize=8)
        a2.set(xlabel="round", ylabel="rate", ylim=(0, 1.05), title="Pair correctness (task truth)")
        a2.grid(alpha=0.3)
        if a2.get_legend_handles_labels()[0]:
            a2.legend(fontsize=8)
        files.append(_save(fig, run_dir / "pairs.png"))

    if bench:
        b0 = bench[0]
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
        _plot_lines(a1, data, {b0: lambda e: e.get("benchmarks", {}).get(b0, {}).get("mean_steps")},
                    "steps", "Steps per solution")
        _plot_lines(a2, data, {b0: lambda e: e.get("benchmarks", {}).get(b0, {}).get("mean_step_chars")},
                    "characters", "Mean step length")
        _plot_lines(a3, data, {b0: lambda e: e.get("benchmarks", {}).get(b0, {}).get("answered")},
                    "share", "Solutions that give a final answer", share=True)
        files.append(_save(fig, run_dir / "steps.png"))

    curves = [(m, c["round"], c["train_log"]) for m, chain in data["methods"].items() for c in chain if c["train_log"]]
    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for method, r, log in curves:
            hist = [h for h in log.get("log_history", []) if "loss" in h]
            steps = [h.get("step", i) for i, h in enumerate(hist)]
            a1.plot(steps, [h["loss"] for h in hist], label=f"{method.upper()} round {r}")
            a2.plot(steps, [h.get("rewards/margins") for h in hist], label=f"{method.upper()} round {r}")
        a1.set_title("DPO loss")
        a2.set_title("Reward margin (chosen - rejected)")
        for a in (a1, a2):
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        files.append(_save(fig, run_dir / "dpo.png"))
    return files


def summary_rows(data: dict) -> list[list[str]]:
    bench = _benchmarks(data)
    evals = [e for _, e in _points(data, None) + [p for m in data["methods"] for p in _points(data, m)]]
    # per benchmark: greedy accuracy, then what the evals measured beside it, then the answered share
    cols = []
    for b in bench:
        cols.append((b, b, "accuracy"))
        extras = []
        for e in evals:
            extras += [k for k in _extra_measures(e, b) if k not in extras]
        cols += [(f"{b} {_SHORT.get(k, k)}", b, k) for k in extras]
        if any(((e.get("benchmarks") or {}).get(b) or {}).get("answered") is not None for e in evals):
            cols.append((f"answered ({b})", b, "answered"))
        if any(((e.get("benchmarks") or {}).get(b) or {}).get("steps_right") is not None for e in evals):
            cols.append((f"steps right ({b})", b, "steps_right"))  # right answers by right steps only
    header = ["model", "method", *[c[0] for c in cols], "judge acc", "order agree",
              "pairs", "chosen right", "rejected wrong", "ties", "own steps: kept right / random"]
    rows = [header]

    def fmt(v):
        return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    def row(label, method, e, pairs=None):
        j = (e or {}).get("judge") or {}
        truth = (pairs or {}).get("truth") or {}
        benchmarks = (e or {}).get("benchmarks", {})
        return [label, method, *[fmt((benchmarks.get(b) or {}).get(k)) for _, b, k in cols],
                fmt(j.get("accuracy")), fmt(j.get("order_agreement")), fmt((pairs or {}).get("pairs")),
                fmt(truth.get("chosen_right")), fmt(truth.get("rejected_wrong")), fmt((pairs or {}).get("tie_rate")),
                own_steps(pairs)]

    def own_steps(pairs):
        j = (pairs or {}).get("judge_in_search") or {}
        if not j.get("mixed_steps"):
            return "—"
        return f"{j['kept_right_when_mixed']:.2f} / {j['random_right_when_mixed']:.2f} (n={j['mixed_steps']})"

    if data["m0"]:  # a run given its M1 may skip M0 (eval_m0: false)
        rows.append(row("M0", "base", data["m0"]))
    rows.append(row("M1", "given (m1)" if data.get("m1_given") else "init (SFT)", data["m1"]))
    for method, chain in data["methods"].items():
        for c in chain:
            rows.append(row(f"M{c['round'] + 1}", f"{method.upper()} round {c['round']}", c["eval"], c["pairs"]))
    return rows


def table1_rows(data: dict) -> list[list[str]]:
    """The paper's Table 1 layout: one row per model, its accuracy (%) on each benchmark and their average, the
    unweighted mean over benchmarks as the paper takes it (AIME's 30 problems weigh as much as GSM8K's 1319).
    A model missing a benchmark gets no average rather than one over fewer benchmarks."""
    bench = _benchmarks(data)
    rows = [["model", *bench, "Avg."]]

    def row(label, e):
        acc = [((e or {}).get("benchmarks", {}).get(b) or {}).get("accuracy") for b in bench]
        avg = sum(acc) / len(acc) if acc and None not in acc else None
        cells = ["—" if a is None else f"{100 * a:.1f}" for a in acc]
        return [label, *cells, "—" if avg is None else f"{100 * avg:.1f}"]

    if data["m0"]:
        rows.append(row("M0", data["m0"]))
    rows.append(row("M1", data["m1"]))
    for method, chain in data["methods"].items():
        rows += [row(f"M{c['round'] + 1} {method.upper()}", c["eval"]) for c in chain]
    return rows


def paired_difference(base: dict, other: dict) -> dict | None:
    """``other``'s accuracy minus ``base``'s on the problems both solved-or-not, paired by problem id
    (same held-out problems for every model): the difference, its 95% interval and z."""
    ids = sorted(set(base) & set(other))
    if not ids:
        return None
    d = [int(other[i]) - int(base[i]) for i in ids]
    n, mean = len(d), sum(d) / len(d)
    sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 if n > 1 else 0.0
    se = sd / n ** 0.5
    return {"n": n, "difference": mean, "interval": (mean - 1.96 * se, mean + 1.96 * se),
            "z": mean / se if se else None}


def _correct_by_id(d: Path, bench: str) -> dict:
    rows = (_load(d / f"eval_{bench}.json") or {}).get("problems") or []
    return {r["id"]: bool(r["correct"]) for r in rows}


def difference_rows(run_dir: Path, data: dict, alpha: float = 0.05) -> list[list[str]]:
    """Every model against M1 (and M1 against M0), per benchmark: is the change more than noise?
    Each comparison's two-sided p, and Holm's adjusted p over all the comparisons of the table (those
    with a z: a model whose answers did not change at all is no test): "yes" where it is below
    ``alpha``, i.e. significant with the family-wise error rate held at ``alpha``."""
    rows = [["model", "benchmark", "n", "accuracy", "vs M1", "95% interval", "z", "p", "Holm p", "significant"]]
    chain = model_stages(data)[1:]
    found = []
    for bench in _benchmarks(data):
        m1 = _correct_by_id(run_dir / "init", bench)
        for label, sub in chain:
            mine = _correct_by_id(run_dir / sub, bench)
            base, vs = (_correct_by_id(run_dir / "m0", bench), "M0") if label == "M1" else (m1, "M1")
            diff = paired_difference(base, mine)
            if diff is not None:
                found.append((label, bench, vs, diff, sum(mine.values()) / len(mine)))
    tested = [i for i, f in enumerate(found) if f[3]["z"] is not None]
    adjusted = dict(zip(tested, holm([two_sided_p(found[i][3]["z"]) for i in tested])))
    for i, (label, bench, vs, diff, acc) in enumerate(found):
        lo, hi = diff["interval"]
        z = diff["z"]
        p = None if z is None else two_sided_p(z)
        rows.append([label, bench, str(diff["n"]), f"{acc:.3f}", f"{diff['difference']:+.3f} (vs {vs})",
                     f"{lo:+.3f} to {hi:+.3f}", "—" if z is None else f"{z:.2f}",
                     "—" if p is None else f"{p:.3g}", "—" if i not in adjusted else f"{adjusted[i]:.3g}",
                     "—" if i not in adjusted else ("yes" if adjusted[i] < alpha else "no")])
    return rows


def significance_note(diffs: list[list[str]]) -> str:
    """How to read the difference table: the rule, corrected for the number of comparisons, and what
    the intervals do not cover."""
    m = sum(r[8] != "—" for r in diffs[1:])
    return (f"Paired by problem; z and two-sided p per comparison. \"significant\" uses Holm's correction over "
            f"the {m} comparisons with a z in this table (family-wise error 5%); an uncorrected |z| >= 2 would "
            f"call about one in twenty of them significant by chance. Each arm is one training run (one seed): "
            f"the intervals cover the sampling of held-out problems, not the spread between training runs.")


def _share(x) -> str:
    return "—" if x is None else f"{x:.0%}"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def summary_table(run_dir: str | Path) -> str:
    """The report's key lines as plain text (printed at the end of a run)."""
    data = collect(run_dir)
    text = _plain(summary_rows(data))
    if len(_benchmarks(data)) > 1:
        text += "\n\naccuracy (%) per benchmark and their average (the paper's Table 1):\n" + _plain(table1_rows(data))
    diffs = difference_rows(Path(run_dir), data)
    return text + ("\n\nagainst M1 (M1 against M0):\n" + _plain(diffs) + "\n" + significance_note(diffs)
                   if len(diffs) > 1 else "")


def stage_times(run_dir: str | Path) -> list[tuple[str, float]]:
    """(stage id, seconds) from the ``<stage>.done`` markers, in the order the stages finished."""
    done = [_load(p) for p in Path(run_dir).rglob("*.done")]
    done.sort(key=lambda d: d.get("finished_at", ""))
    return [(d["stage"], d["seconds"]) for d in done if "stage" in d and "seconds" in d]


def model_stages(data: dict) -> list[tuple[str, str]]:
    """(label, stage folder) of every model the run evaluated: M0, M1, then each method's rounds."""
    return [("M0", "m0"), ("M1", "init")] + [(f"M{c['round'] + 1} {m.upper()}", f"{m}/round_{c['round']}")
                                              for m, cs in data["methods"].items() for c in cs]


def write_per_problem(run_dir: Path, data: dict) -> Path:
    """``per_problem.jsonl``: every evaluated model's grade on every held-out problem (model, benchmark, problem
    id, right or wrong, answered or not), so that each accuracy and paired difference of the report can be
    re-derived from one small file (results/ keeps it; the eval JSONs with whole solutions stay in the run)."""
    rows = []
    for label, sub in model_stages(data):
        for bench in _benchmarks(data):
            for r in (_load(run_dir / sub / f"eval_{bench}.json") or {}).get("problems") or []:
                rows.append({"model": label, "stage": sub, "benchmark": bench, "id": r["id"],
                             "correct": bool(r["correct"]), "answered": r.get("answered"),
                             **({} if r.get("steps_right") is None else {"steps_right": r["steps_right"]})})
    return write_jsonl_atomic(run_dir / "per_problem.jsonl", rows)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    data = collect(run_dir)
    plots = write_plots(run_dir, data)
    write_per_problem(run_dir, data)
    lines = [f"# Run report: {run_dir.name}", "",
             "Accuracy is greedy pass@1 on held-out problems, graded by the first final answer a solution gives "
             "(none is wrong; \"answered\" is the share that gives one; \"steps right\", where the task checks "
             "steps, counts only right answers whose every step is right); the judge is scored on held-out "
             "right-vs-corrupted step pairs (both orders); pairs' correctness uses the task's step truth, "
             "which never feeds PSR's or SRLM's pairs (the ORACLE arm, when run, is judged by it: what a "
             "perfect judge would give).", "",
             markdown_table(summary_rows(data)), ""]
    if len(_benchmarks(data)) > 1:
        lines += ["Accuracy (%) on each benchmark and the unweighted average over them, as the paper's Table 1 "
                  "reports it:", "", markdown_table(table1_rows(data)), ""]
    diffs = difference_rows(run_dir, data)
    if len(diffs) > 1:
        lines += ["Each model against M1 (M1 against M0) on the same held-out problems: the difference in "
                  "accuracy and its 95% interval.", "", markdown_table(diffs), "", significance_note(diffs), ""]
    for method, chain in data["methods"].items():
        for c in chain:
            if c["pairs"]:
                p = c["pairs"]
                lines.append(f"- {method.upper()} round {c['round']}: {p['pairs']} pairs from {p['problems']} "
                             f"problems, search ended {p['status']}, "
                             f"judge order disagreement {p.get('order_disagreement_rate')}, "
                             f"tie rule fired at {p.get('ties', 0)} steps ({_share(p.get('tie_rate'))})")
                ends = p.get("endings")
                if ends and ends["chosen_goes_on_rejected_answers"] + ends["chosen_answers_rejected_goes_on"]:
                    lines.append(f"  - answer or go on: in {ends['chosen_goes_on_rejected_answers']} of "
                                 f"{ends['step_pairs']} pairs the chosen step goes on while the rejected one "
                                 f"gives the answer; the reverse in "
                                 f"{ends['chosen_answers_rejected_goes_on']}")
                mix = (p.get("truth") or {}).get("mix")
                if mix and method != "oracle":
                    lines.append(f"  - pairs by the task's truth: right over wrong {mix['right_over_wrong']}, wrong "
                                 f"over wrong {mix['wrong_over_wrong']}, wrong over right {mix['wrong_over_right']}, "
                                 f"right over right {mix['right_over_right']}")
                j = p.get("judge_in_search")
                if j and j["mixed_steps"]:
                    who = "the task's step check (oracle)" if method == "oracle" else "judge on its own candidates"
                    lines.append(f"  - {who}: {j['no_right_candidate']:.0%} of {j['steps']} steps had no "
                                 f"right candidate, {j.get('ties', 0):.0%} were ties (rolled back); at the "
                                 f"{j['mixed_steps']} steps with right and wrong ones it kept a right one "
                                 f"{j['kept_right_when_mixed']:.0%} of the time "
                                 f"(random pick: {j['random_right_when_mixed']:.0%})")
    lines.append("")
    times = stage_times(run_dir)
    if times:
        lines += ["| stage | minutes |", "|---|---|"] + [f"| {s} | {t / 60:.1f} |" for s, t in times]
        lines += [f"| **total** | **{sum(t for _, t in times) / 60:.1f}** |", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="psr report")
    ap.add_argument("run", help="run folder, e.g. runs/demo")
    args = ap.parse_args(argv)
    path = write_report(args.run)
    print(summary_table(args.run))
    print(f"wrote {path}")
    return 0
