"""Per-round metrics reach the trackers (report_to): TensorBoard event files of a tiny run, one step per
model, the same values as the run's eval.json and pair_stats.json."""

from pathlib import Path

import pytest

from psr.config import ConfigError, load_config
from psr.files import read_json
from psr.rounds import RunConfig, iterate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_model_of_a_run_is_one_step_on_tensorboard(tmp_path):
    run = iterate(load_config(RunConfig, TINY, {"rounds": 2, "report_to": ["tensorboard"]}), tmp_path / "run",
                  progress=False)
    got = scalars(run / "tensorboard" / "rounds" / "psr")
    evals = [read_json(run / d / "eval.json") for d in ("m0", "init", "psr/round_1", "psr/round_2")]
    for tag, value in (("accuracy/arithmetic", lambda e: e["benchmarks"]["arithmetic"]["accuracy"]),
                       ("judge/accuracy", lambda e: e["judge"]["accuracy"])):
        assert [s for s, _ in got[tag]] == [0, 1, 2, 3]
        assert [v for _, v in got[tag]] == pytest.approx([value(e) for e in evals], abs=1e-6)
    assert [s for s, _ in got["answered/arithmetic"]] == [0, 1, 2, 3]
    pairs = [read_json(run / f"psr/round_{r}" / "pair_stats.json") for r in (1, 2)]
    assert got["pairs/count"] == [(r + 1, float(p["pairs"])) for r, p in enumerate(pairs, 1)]
    assert [s for s, _ in got["pairs/tie_rate"]] == [2, 3]


def test_report_to_names_a_tracker_the_rounds_can_log_to():
    with pytest.raises(ConfigError, match="report_to: the rounds log to tensorboard or wandb, got 'mlflow'"):
        load_config(RunConfig, TINY, {"report_to": ["mlflow"]})
