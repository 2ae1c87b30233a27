"""The loop: tiny recipe end to end, resume after SIGKILL, config-change refusal, report, recipes, SLURM."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from psr.config import ConfigError, load_config
from psr.rounds import RunConfig, iterate

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _run(run_dir, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "recipes" / "iterate.py"), "--config", str(TINY),
                             "--run", str(run_dir), *extra], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _without_paths_and_timings(data):
    if isinstance(data, dict):
        return {k: _without_paths_and_timings(v) for k, v in data.items()
                if k not in ("throughput", "seconds", "config", "model", "made_by")}
    return [_without_paths_and_timings(v) for v in data] if isinstance(data, list) else data


def _artifacts(run_dir: Path) -> dict:
    """Everything a run produced that must not depend on being interrupted (timings left out)."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        # made_by.json holds the model's file times (what made a cache), not a result
        if path.is_dir() or "tensorboard" in rel or rel.endswith((".done", ".png", "report.md", "train_log.json")) \
                or "timing" in rel or "config.yaml" == rel or path.name == "made_by.json":
            continue
        if path.suffix == ".json":
            out[rel] = _without_paths_and_timings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            out[rel] = [json.loads(line) for line in path.read_text().splitlines()]
        else:
            out[rel] = path.read_bytes()
    return out


def _differences(a, b, where="") -> list[str]:
    """Where two runs' artifacts differ, field by field (a failure names the file and field, e.g. a temporary
    file a killed write left behind, instead of dumping both runs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())} in one run only"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:200]!r} != {str(b)[:200]!r}"]


def test_tiny_loop_survives_sigkill_and_matches_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "straight")
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-3000:]
    assert "report: " in out and "M3" in out  # the closing table and the report's path

    # Kill a second run with SIGKILL in the middle of the round-1 search, then start it again.
    killed_dir = tmp_path / "killed"
    proc = _run(killed_dir)
    chunks = killed_dir / "psr" / "round_1" / "search_chunks"
    deadline = time.time() + 600
    while time.time() < deadline and not (chunks.exists() and any(chunks.glob("0*.jsonl"))):
        time.sleep(0.01)  # the tiny search's 6 chunks take ~0.1 s each here
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed_dir / "init" / "init.done").exists()
    assert not (killed_dir / "psr" / "round_1" / "search.done").exists()
    resumed = _run(killed_dir)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "stage 2/9: init/init" not in out  # finished stages were not redone
    assert _differences(_artifacts(killed_dir), _artifacts(tmp_path / "straight")) == []

    # The report: markdown with the table and valid PNG plots.
    report = (killed_dir / "report.md").read_text()
    assert "| M3 | PSR round 2 |" in report
    from psr.report import collect

    answered = collect(killed_dir)["m1"]["benchmarks"]["arithmetic"]["answered"]  # from eval_arithmetic.json's outputs
    outputs = [r["output"] for r in json.loads((killed_dir / "init" / "eval_arithmetic.json").read_text())["problems"]]
    assert answered == sum(bool(re.search(r"\\boxed\{[^{}]*\}", o)) for o in outputs) / len(outputs)
    assert "| m0/eval |" in report and "| psr/round_2/eval |" in report and "| **total** |" in report  # stage times
    import matplotlib.image as mpimg

    for png in ("accuracy.png", "judge.png", "pairs.png", "steps.png", "dpo.png"):
        assert (killed_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert mpimg.imread(killed_dir / png).shape[0] > 100

    # A changed config is refused once stages are done, naming the key ...
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"]["beta"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"train\.beta"):
        iterate(load_config(RunConfig, changed), killed_dir, progress=False)
    # ... and with --restart-from only when no finished stage before the restart point used it ...
    with pytest.raises(ConfigError, match=r"train\.beta is used by finished stage psr/round_1/train"):
        iterate(load_config(RunConfig, changed), killed_dir, restart_from="psr/round_2/train", progress=False)
    # ... then only that stage and later ones are redone, under the new config.
    before = json.loads((killed_dir / "psr" / "round_1" / "search.done").read_text())
    trained = json.loads((killed_dir / "psr" / "round_1" / "train.done").read_text())
    iterate(load_config(RunConfig, changed), killed_dir, restart_from="psr/round_1/train", progress=False)
    assert json.loads((killed_dir / "psr" / "round_1" / "search.done").read_text()) == before
    assert json.loads((killed_dir / "psr" / "round_1" / "train.done").read_text()) != trained
    assert yaml.safe_load((killed_dir / "config.yaml").read_text())["train"]["beta"] == 0.5


def test_unknown_restart_stage_and_bad_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such stage"):
        iterate(load_config(RunConfig, TINY), tmp_path / "r", restart_from="psr/round_9/search", progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsearch:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key search.widht"):
        load_config(RunConfig, bad)


def test_the_runs_engine_samples_inits_own_search_unless_init_names_one(tmp_path):
    """generation.backend: vllm used to reach the rounds' search and eval but not init's build-eft, which
    sampled on HF; an engine set under init.eft_search stays."""
    from psr.rounds import init_config

    cfg = load_config(RunConfig, ROOT / "recipes/smollm2/iterate/config_experiment_v4.yaml")
    assert cfg.generation.backend == "vllm"
    icfg = init_config(cfg, tmp_path / "model")
    assert icfg.eft_search.generation == cfg.generation and icfg.model == cfg.model and icfg.data_seed == cfg.seed
    own = tmp_path / "own.yaml"
    own.write_text("name: x\ngeneration: {backend: vllm}\ninit:\n  eft_search:\n    generation: {backend: hf, "
                   "max_model_len: 1024}\n")
    assert init_config(load_config(RunConfig, own), tmp_path / "m").eft_search.generation.max_model_len == 1024


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")))
def test_every_recipe_validates(recipe):
    """recipes/<model>/<stage>/config_<variant>.yaml: each parses strictly into its command's config
    (run recipes under iterate/, GPU ones included, which cannot run here)."""
    from psr.cli import COMMANDS, config_class

    model, stage, name = Path(recipe).parts[1:]
    assert stage in COMMANDS and name.startswith("config_"), recipe
    cfg = load_config(config_class(stage), ROOT / recipe)
    if stage == "iterate":
        assert cfg.rounds >= 1 and cfg.methods


def test_slurm_scripts_parse_and_build_the_launch_command(tmp_path):
    for script in ("multinode.sbatch", "stage.sbatch"):
        assert subprocess.run(["bash", "-n", str(ROOT / "recipes" / "slurm" / script)]).returncode == 0
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # A stand-in for SLURM's scontrol, which this machine does not have: it expands the 2-node list.
    (fake_bin / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-01\\ngpu-node-02\\n'\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "PSR_DRY_RUN": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[01-02]"}
    qwen = "recipes/qwen2.5-math-7b/iterate/config_psr.yaml"
    out = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "multinode.sbatch"), qwen], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        'srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "accelerate launch '
        "--config_file accelerate_configs/deepspeed_zero3.yaml "
        "--num_machines 2 --num_processes 16 --machine_rank $SLURM_NODEID --main_process_ip gpu-node-01 "
        f'--main_process_port 29500 --rdzv_backend c10d recipes/iterate.py --config {qwen} "')
    demo = "recipes/smollm2/iterate/config_demo.yaml"
    out = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "stage.sbatch"), demo, "search"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["accelerate", "launch", "--config_file", "accelerate_configs/deepspeed_zero3.yaml",
                                  "--num_machines", "1", "--num_processes", "8", "recipes/iterate.py", "--config",
                                  demo, "--stop-after", "search"]


def test_srlm_rounds_then_the_oracle_arm_appended_through_the_loop(tmp_path):
    data = yaml.safe_load(TINY.read_text())
    data.update(methods=["srlm"], rounds=1, eval_m0=False)
    data["search"]["srlm"] = {"samples": 3, "max_new_tokens": 12}
    recipe = tmp_path / "srlm.yaml"
    recipe.write_text(yaml.safe_dump(data))
    run = iterate(load_config(RunConfig, recipe), tmp_path / "run", progress=False)
    pairs = [json.loads(line) for line in (run / "srlm" / "round_1" / "pairs.jsonl").open()]
    assert all(p["kind"] == "solution" and p["method"] == "srlm" for p in pairs)
    summary = json.loads((run / "srlm" / "round_1" / "eval.json").read_text())
    assert 0.0 <= summary["benchmarks"]["arithmetic"]["test_time_search_accuracy"] <= 1.0
    assert (run / "srlm" / "round_1" / "tts_arithmetic" / "search.jsonl").exists()
    assert "| M2 | SRLM round 1 |" in (run / "report.md").read_text()

    # The oracle arm (PSR judged by the task's step check) added to the finished run: appending to
    # methods is accepted and runs only the new stages; reordering is refused like any other change.
    srlm_done = (run / "srlm" / "round_1" / "train.done").read_text()
    data["methods"] = ["oracle", "srlm"]
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"\(methods\)"):
        iterate(load_config(RunConfig, recipe), run, progress=False)
    data["methods"] = ["srlm", "oracle"]
    recipe.write_text(yaml.safe_dump(data))
    iterate(load_config(RunConfig, recipe), run, progress=False)
    assert (run / "srlm" / "round_1" / "train.done").read_text() == srlm_done
    assert (run / "oracle" / "round_1" / "eval.done").exists()
    traces = [json.loads(line) for line in (run / "oracle" / "round_1" / "search.jsonl").open()]
    for e in (e for t in traces for e in t["events"]):
        right = [c is True for c in e["candidate_correct"]]
        assert e["tie"] == (all(right) or not any(right))  # the task's step check judged, not the model
    pairs = [json.loads(line) for line in (run / "oracle" / "round_1" / "pairs.jsonl").open()]
    assert all(p["chosen_correct"] is True and p["rejected_correct"] is False for p in pairs)
    assert "ORACLE round 1" in (run / "report.md").read_text()


def test_rounds_start_from_a_given_m1_without_training_one(tmp_path):
    from psr.models import tiny_model_path

    data = yaml.safe_load(TINY.read_text())
    data.update(rounds=1, eval_m0=False, m1="/no/such/m1")
    recipe = tmp_path / "given.yaml"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"m1: model path /no/such/m1 does not exist"):
        iterate(load_config(RunConfig, recipe), tmp_path / "bad", progress=False)

    data["m1"] = str(tiny_model_path())
    recipe.write_text(yaml.safe_dump(data))
    run = iterate(load_config(RunConfig, recipe), tmp_path / "run", progress=False)
    marker = json.loads((run / "init" / "init.done").read_text())
    assert marker["given"] is True and marker["model"] == str(tiny_model_path().resolve())
    assert not (run / "init" / "model").exists()  # nothing trained
    assert json.loads((run / "init" / "eval.json").read_text())["model"] == str(tiny_model_path().resolve())
    assert (run / "psr" / "round_1" / "eval.done").exists()
    assert "| M1 | given (m1) |" in (run / "report.md").read_text()


def test_a_run_start_removes_the_temporary_files_of_writes_a_kill_cut_short(tmp_path):
    """A SIGKILL during an atomic write leaves its hidden temporary file (``.search.jsonl.k3j9x_2a``); the next
    start of the run removes such files from the run and stage folders, and nothing else."""
    from rich.console import Console

    from psr.rounds import _start_run, plan

    cfg = load_config(RunConfig, TINY)
    run = tmp_path / "run"
    stages = plan(cfg, run)
    search = next(s for s in stages if s.id == "psr/round_1/search").dir
    search.mkdir(parents=True)
    left = [search / ".search.jsonl.k3j9x_2a", search / ".pairs.jsonl.a1b2c3d4", run / ".config.yaml.zz99yy88"]
    kept = [run / ".lock", search / ".notes", search / "search.jsonl", search / ".hidden.dir.abcdefgh" / "x"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{")
    _start_run(cfg, run, stages, None, Console(stderr=True))
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)
