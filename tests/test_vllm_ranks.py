"""The loop's evaluation stage on vLLM under 2 CPU ranks (issue 29): a benchmark with its own dtype and the
judge's held-out pairs each need an engine; engines are built by all ranks together (vLLM's external launcher
is collective), one at a time, and every rank closes its own. Before, rank 0 built the judge's engine alone
(while rank 1 had left the stage and waited at its barrier) beside the benchmark's. Runs where vLLM imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]
ROOT = Path(__file__).resolve().parents[1]


def test_eval_stage_with_judge_and_benchmark_dtype_on_two_vllm_ranks(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "r", "model": "smollm2-135m", "m1": "smollm2-135m", "rounds": 0, "eval_m0": False,
        "judge_eval_limit": 2, "generation": {"backend": "vllm", "kv_cache_gb": 0.5},
        "benchmarks": [{"name": "arithmetic", "limit": 2, "chunk_size": 1, "max_new_tokens": 32,
                        "dtype": "float32"}]}))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PSR_DIST_TIMEOUT": "300",
           "PYTHONPATH": str(ROOT)}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / "multi_cpu.yaml"), str(ROOT / "recipes" / "iterate.py"),
           "--config", str(recipe), "--run", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((tmp_path / "run" / "init" / "eval.json").read_text())
    assert summary["judge"]["n"] == 2 and "arithmetic" in summary["benchmarks"]
    ranks = json.loads((tmp_path / "run" / "init" / "eval_arithmetic.json").read_text())["throughput"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
