"""The real embedded model through every stage of the loop (init, search with its own judge, pairs,
step-DPO, eval, report), the way `make demo` runs it, on a few problems. tiny-random never writes a
real step, so only this catches what the demo would hit (prose steps, blank lines, ties)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.embedded
def test_embedded_model_runs_every_stage(tmp_path):
    run = tmp_path / "smoke"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    recipe = ROOT / "tests" / "recipes" / "smoke.yaml"
    done = subprocess.run([sys.executable, "-m", "psr.cli", "iterate", "--config", str(recipe), "--run", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for marker in ("init/init.done", "init/eval.done", "psr/round_1/search.done", "psr/round_1/train.done",
                   "psr/round_1/eval.done"):
        assert (run / marker).exists(), marker
    traces = [json.loads(line) for line in (run / "psr" / "round_1" / "search.jsonl").open()]
    assert len(traces) == 3 and all(t["events"] for t in traces)
    # real steps, not blanks: a real model may end at once after a step that says "the answer is" (a blank
    # candidate, which the search handles), but most candidates are steps
    cands = [c for t in traces for e in t["events"] for c in e["candidates"]]
    assert sum(bool(c.strip()) for c in cands) >= 0.8 * len(cands)
    assert all(c.strip() for t in traces for c in t["events"][0]["candidates"][:1])
    stats = json.loads((run / "psr" / "round_1" / "pair_stats.json").read_text())
    assert stats["pairs"] > 0 and "judge_in_search" in stats
    train = json.loads((run / "psr" / "round_1" / "train.done").read_text())
    assert "skipped" not in train and (run / "psr" / "round_1" / "model" / "model.safetensors").exists()
    result = json.loads((run / "psr" / "round_1" / "eval.json").read_text())
    assert result["benchmarks"]["arithmetic"]["n"] == 4 and "judge" in result
    report = (run / "report.md").read_text()
    assert "M2" in report and "PSR round 1" in report
    assert "PSR round 1" in done.stdout  # the summary table is printed at the end of the run
