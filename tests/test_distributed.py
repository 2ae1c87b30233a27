"""The trainers under ``accelerate launch`` with 2 processes on the CPU (gloo): the ranks end with
identical weights and the saved model is complete. DeepSpeed ZeRO-2 (compiles a helper on first
use: minutes) is marked slow."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from psr.models import load_model, load_tokenizer
from psr.train.step_dpo import oracle_pairs

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate launcher not installed")


def _launch(config: str, args: list[str], tmp_path: Path, extra: list[str] = (), timeout: int = 600) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
           "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs" / config), *extra,
           str(ROOT / "tests" / "dist_train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    folder = Path(args[3])  # CHECKSUMS
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


@pytest.fixture()
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(load_tokenizer("tiny-random"), 8, seed=5)))
    return path


def _check(ranks: dict, out: Path, distributed_type: str):
    assert sorted(ranks) == [0, 1]
    assert all(r["world_size"] == 2 and r["steps"] == 3 and distributed_type in r["distributed_type"]
               for r in ranks.values())
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # data-parallel ranks end with identical weights
    model, _ = load_model(str(out), device="cpu")  # the saved model is complete and loads
    start, _ = load_model("tiny-random", device="cpu")
    changed = any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), start.parameters()))
    assert changed and json.loads((out / "train_log.json").read_text())["world_size"] == 2
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())


def test_step_dpo_two_cpu_processes_end_identical(tmp_path, pairs):
    out, sums = tmp_path / "model", tmp_path / "checksums"
    ranks = _launch("multi_cpu.yaml", ["train", str(pairs), str(out), str(sums)], tmp_path)
    assert all(r["backend"] == "gloo" for r in ranks.values())
    _check(ranks, out, "MULTI_CPU")


def test_precomputed_reference_log_probs_under_two_processes(tmp_path, pairs):
    """TRL caches the precomputed reference log-probs under a name from the dataset's cache file; for a
    dataset built in memory that is a random per-process name, so rank 1 looked for a file only rank 0 had
    written (FileNotFoundError). psr puts the tokenised pairs on a file in the stage's folder instead."""
    out, sums = tmp_path / "model", tmp_path / "checksums"
    ranks = _launch("multi_cpu.yaml", ["train", str(pairs), str(out), str(sums), "precompute"], tmp_path)
    _check(ranks, out, "MULTI_CPU")


@pytest.mark.slow
def test_sft_two_cpu_processes_end_identical(tmp_path):
    out, sums = tmp_path / "model", tmp_path / "checksums"
    _check(_launch("multi_cpu.yaml", ["init", "-", str(out), str(sums)], tmp_path), out, "MULTI_CPU")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="DeepSpeed needs a C++ compiler")
def test_step_dpo_deepspeed_zero2_on_cpu(tmp_path, pairs):
    pytest.importorskip("deepspeed")
    out, sums = tmp_path / "model", tmp_path / "checksums"
    ranks = _launch("deepspeed_zero2.yaml", ["train", str(pairs), str(out), str(sums)], tmp_path,
                    extra=["--num_processes", "2", "--mixed_precision", "no"], timeout=1200)
    _check(ranks, out, "DEEPSPEED")
