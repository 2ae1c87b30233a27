"""The hub block up to the upload, on a tiny run's local files: repo ids and branches, the model card's
contents, the datasets' features; and hub ids read back as pairs (no hub is reachable from here)."""

import dataclasses
from pathlib import Path

import pytest

from psr.config import ConfigError, from_dict, load_config
from psr.files import read_jsonl
from psr.hub import DataPush, ModelPush, dataset_of, plan_pushes
from psr.rounds import RunConfig, iterate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"


def test_a_runs_models_and_data_planned_for_the_hub(tmp_path):
    cfg = load_config(RunConfig, TINY, {"rounds": 1, "report_to": []})
    run = iterate(cfg, tmp_path / "run", progress=False)
    cfg = dataclasses.replace(cfg, hub=from_dict(RunConfig, {"hub": {"push": True, "model_id": "me/tiny"}}).hub)
    assert plan_pushes(cfg, run, "m0/eval") == []
    m1, ift, eft = plan_pushes(cfg, run, "init/eval")
    assert (m1.repo_id, m1.branch, m1.folder) == ("me/tiny-psr", "m1", run / "init" / "model")
    assert isinstance(ift, DataPush) and (ift.repo_id, ift.config, ift.split) == ("me/tiny-data", "ift", "train")
    assert ift.rows == read_jsonl(run / "init" / "model" / "ift.jsonl") and eft.config == "eft"
    model, pairs = plan_pushes(cfg, run, "psr/round_1/eval")
    assert isinstance(model, ModelPush) and (model.repo_id, model.branch) == ("me/tiny-psr", "round_1")
    assert model.folder == run / "psr" / "round_1" / "model"
    n = len(read_jsonl(run / "psr" / "round_1" / "pairs.jsonl"))
    card = model.card
    assert card.startswith("---\n") and "library_name: transformers" in card and "datasets:\n- me/tiny-data" in card
    assert "round 1 of PSR (step-wise DPO), method `psr`" in card and f"Trained on {n} step-level" in card
    assert "| model | method | arithmetic |" in card and "| M2 | PSR round 1 |" in card
    assert "| M1 | init (SFT) |" in card
    assert "hub:\n  push: true\n  model_id: me/tiny" in card and "model: tiny-random" in card  # the run's config
    assert (pairs.config, pairs.split) == ("pairs", "psr_round_1") and len(pairs.rows) == n
    features = dataset_of(pairs.rows).features
    assert all(features[k].dtype == "string" for k in ("prompt", "chosen", "rejected"))


def test_hub_block_is_checked_at_load_and_is_no_config_change():
    with pytest.raises(ConfigError, match="hub.model_id is needed with hub.push"):
        from_dict(RunConfig, {"hub": {"push": True}})
    with pytest.raises(ConfigError, match="hub.model_id must be a hub repo id like org/name, got 'a b'"):
        from_dict(RunConfig, {"hub": {"model_id": "a b"}})
    from psr.rounds import changed_keys

    old = dataclasses.asdict(from_dict(RunConfig, {}))
    new = dataclasses.asdict(from_dict(RunConfig, {"hub": {"push": True, "model_id": "me/x"}}))
    assert changed_keys(old, new) == []  # publishing changes no stage's result


def test_pairs_and_init_data_take_hub_ids(monkeypatch):
    import datasets

    from psr.tasks.jsonl import is_hub_id
    from psr.train.step_dpo import load_pairs

    asked = []
    row = {"prompt": "p", "chosen": "Step 1: a", "rejected": "Step 1: b", "question": "q", "previous_steps": []}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: asked.append((name, config, split))
                        or [row])
    assert is_hub_id("me/tiny-data:pairs:psr_round_1") and not is_hub_id("runs/x/pairs.jsonl")
    assert load_pairs("me/tiny-data:pairs:psr_round_1")[0]["chosen"] == "Step 1: a"
    assert asked == [("me/tiny-data", "pairs", "psr_round_1")]
    from psr.tasks.jsonl import read_rows

    read_rows("openai/gsm8k:test")
    assert asked[-1] == ("openai/gsm8k", "main", "test")
