"""Per-round metrics of a run to the trackers its config names (``report_to``): one step per model,
so a run is a set of curves in TensorBoard or W&B.

Step 0 is M0, step 1 is M1 (init), step ``r + 1`` is the model after round ``r``. Each method is its
own TensorBoard run (``<run>/tensorboard/rounds/<method>``, so PSR, SRLM and the oracle overlay on one
chart) and its own prefix in W&B (``psr/accuracy/gsm8k``). M0 and M1 are logged under every method, so
every curve starts where the rounds start. The values are the ones the report shows (:func:`psr.report.collect`):
accuracy and the share of solutions with a final answer per benchmark, the judge's accuracy and order
agreement on held-out pairs, and the round's pairs, tie rate and the truth of chosen/rejected steps.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

TRACKERS = ("tensorboard", "wandb")


def check_report_to(report_to: list[str]) -> None:
    """ValueError at load for a tracker the rounds cannot log to, or one not installed."""
    for name in report_to:
        if name not in TRACKERS:
            raise ValueError(f"report_to: the rounds log to {' or '.join(TRACKERS)}, got {name!r} (a training "
                             "stage's own trackers are train.report_to / init.report_to)")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to: {name} is not installed (pip install {name})")


def metrics_of(eval_summary: dict | None, pair_stats: dict | None = None) -> dict[str, float]:
    """The scalars of one model: its eval.json (as :func:`psr.report.collect` reads it) and its round's pairs."""
    out = {}
    for bench, b in ((eval_summary or {}).get("benchmarks") or {}).items():
        for key, value in b.items():  # accuracy, answered (share with a final answer), maj@k, pass@k, ...
            wanted = key in ("accuracy", "answered", "sample_accuracy", "test_time_search_accuracy")
            if (wanted or key.startswith(("maj@", "pass@"))) and isinstance(value, (int, float)):
                out[f"{key}/{bench}"] = float(value)
    judge = (eval_summary or {}).get("judge") or {}
    for key in ("accuracy", "order_agreement"):
        if isinstance(judge.get(key), (int, float)):
            out[f"judge/{key}"] = float(judge[key])
    p = pair_stats or {}
    for key, tag in (("pairs", "pairs/count"), ("tie_rate", "pairs/tie_rate"), ("ties", "pairs/ties")):
        if isinstance(p.get(key), (int, float)):
            out[tag] = float(p[key])
    for key in ("chosen_right", "rejected_wrong"):
        if isinstance((p.get("truth") or {}).get(key), (int, float)):
            out[f"pairs/{key}"] = float(p["truth"][key])
    return out


def points_of_stage(run_dir: Path, stage_id: str, methods: list[str]) -> list[tuple[str, int, dict[str, float]]]:
    """``(method, step, metrics)`` for a finished eval stage (``m0/eval``, ``init/eval``, ``psr/round_2/eval``)."""
    from psr.report import collect

    data = collect(run_dir)
    group = stage_id.split("/")[0]
    if group in ("m0", "init"):
        values = metrics_of(data["m0" if group == "m0" else "m1"])
        return [(m, 0 if group == "m0" else 1, values) for m in methods or ["run"]]
    r = int(stage_id.split("/")[1].split("_")[1])
    chain = {c["round"]: c for c in data["methods"].get(group, [])}
    c = chain.get(r) or {}
    return [(group, r + 1, metrics_of(c.get("eval"), c.get("pairs")))]


def log_points(run_dir: Path, run_name: str, report_to: list[str], points) -> None:
    """Write ``points`` (:func:`points_of_stage`) to every tracker in ``report_to``."""
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        for method, step, values in points:
            writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / "rounds" / method))
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=step)
            writer.close()
    if "wandb" in report_to:
        import wandb

        # one W&B run per run folder, resumed across restarts; the x axis is the model's step, not W&B's own
        run_id = "psr-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        run = wandb.init(project="psr", name=run_name, id=run_id, resume="allow", reinit="return_previous")
        run.define_metric("model_step")
        run.define_metric("*", step_metric="model_step")
        for method, step, values in points:
            run.log({"model_step": step, **{f"{method}/{k}": v for k, v in values.items()}})


def log_stage(run_dir: Path, run_name: str, report_to: list[str], stage_id: str, methods: list[str]) -> None:
    """After an eval stage: its model's metrics, one step per round."""
    if report_to:
        log_points(Path(run_dir), run_name, report_to, points_of_stage(Path(run_dir), stage_id, methods))
