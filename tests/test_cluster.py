"""Multi-process runs on 2 CPU processes (gloo), as on a cluster (issue 19): evaluation and the test-time
search sharded over the ranks with the result of one process, the process group's timeout, one loop per
run folder, training stages that resume from their checkpoints, and the EOS check of step-DPO."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _without(data, keys=("throughput", "out", "seconds")):
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    return [_without(v, keys) for v in data] if isinstance(data, list) else data


# ---- item 1 + 2: evaluation and test-time search on every rank ---------------------------------
def test_two_processes_shard_evaluation_and_test_time_search_like_one(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["benchmarks"][0].update(chunk_size=1, test_time_limit=4)  # 4 chunks each: both ranks get some
    cfg["search"]["chunk_size"] = 1
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    args = ["iterate", "--config", str(recipe), "--rounds", "0", "--stop-after", "eval"]
    _run([sys.executable, "-m", "psr.cli", *args, "--run", str(tmp_path / "one")])
    _run([*TWO, "-m", "psr.cli", *args, "--run", str(tmp_path / "two")])

    one, two = tmp_path / "one" / "m0", tmp_path / "two" / "m0"
    merged = json.loads((two / "eval_arithmetic.json").read_text())
    assert [r["problems"] for r in merged["throughput"]["ranks"]] == [2, 2]  # rank 1 evaluated half
    assert _without(merged) == _without(json.loads((one / "eval_arithmetic.json").read_text()))
    summaries = [_without(json.loads((d / "eval.json").read_text())) for d in (one, two)]
    assert summaries[0] == summaries[1]
    # the test-time search's ranks claim chunks as they go (psr.inflight): which rank searched which depends on
    # timing, the merged result must not
    for name in ("search.jsonl", "pairs.jsonl"):
        assert (two / "tts_arithmetic" / name).read_text() == (one / "tts_arithmetic" / name).read_text()
    assert not list(two.glob("*.parts"))  # the chunks were merged and removed


def test_killed_evaluation_resumes_at_its_first_unsaved_chunk(tmp_path, tiny, monkeypatch, capsys):
    import psr.evaluate as ev

    model, tok = tiny
    cfg = ev.EvalConfig(model="tiny-random", limit=6, chunk_size=2, max_new_tokens=8,
                        out=str(tmp_path / "eval.json"))
    straight = ev.evaluate(ev.EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "straight.json")}), model, tok,
                           progress=False)
    real, calls = ev._eval_chunk, []

    def dies_on_third(cfg, model, tok, problems, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while evaluating the third chunk
        return real(cfg, model, tok, problems, seed)

    monkeypatch.setattr(ev, "_eval_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg, model, tok, progress=False)
    assert len(list(ev.parts_dir(cfg).glob("0*.jsonl"))) == 2
    calls.clear()
    resumed = ev.evaluate(cfg, model, tok, progress=False)
    assert len(calls) == 1  # only the unsaved chunk was evaluated again
    assert _without(resumed) == _without(straight)
    assert not Path(f"{cfg.out}.parts").exists()
    # finished: the same config and model get the result back without evaluating a chunk (a stage killed after
    # this benchmark resumes past it)
    calls.clear()
    assert ev.evaluate(cfg, model, tok, progress=False) == resumed and calls == []
    # a different config never picks up another's chunks: they are named and done again
    Path(cfg.out).unlink()
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg, model, tok, progress=False)  # two chunks saved again, then killed
    other = ev.EvalConfig(**{**cfg.__dict__, "max_new_tokens": 9})
    calls.clear()
    monkeypatch.setattr(ev, "_eval_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    ev.evaluate(other, model, tok, progress=False)
    assert len(calls) == 3  # every chunk evaluated under the new config
    assert "made by another config or model (max_new_tokens); starting over" in capsys.readouterr().err


def test_process_group_timeout_is_a_setting(tmp_path, monkeypatch):
    from psr.config import ConfigError
    from psr.distributed import DEFAULT_TIMEOUT_S, timeout_seconds
    from psr.train.common import trainer_kwargs
    from psr.train.step_dpo import StepDPOConfig

    _run([*TWO, str(ROOT / "tests" / "dist_probe.py"), str(tmp_path / "probe")],
         env={**ENV, "PSR_DIST_TIMEOUT": "4321"})
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], r["timeout"]) for r in ranks] == [(0, 2, 4321), (1, 2, 4321)]
    assert {r["broadcast"] for r in ranks} == {"from rank 0"}

    monkeypatch.delenv("PSR_DIST_TIMEOUT", raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT_S == 3 * 3600
    monkeypatch.setenv("PSR_DIST_TIMEOUT", "600")
    assert trainer_kwargs(StepDPOConfig())["ddp_timeout"] == 600  # a trainer that sets the group up uses it too
    monkeypatch.setenv("PSR_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="PSR_DIST_TIMEOUT"):
        timeout_seconds()


# ---- item 6: one loop per run folder ---------------------------------------------------------------
def test_a_second_loop_on_the_same_run_folder_is_refused(tmp_path, capsys):
    from psr.cli import main
    from psr.runlock import RunLock, RunLocked

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom psr.runlock import RunLock\n"
                               "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)", str(run)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["iterate", "--config", str(TINY), "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is in use" in err and f"pid {holder.pid} on {socket.gethostname()}" in err
        assert not (run / "config.yaml").exists()  # refused before touching anything
        # under a launcher every rank stops (none waits at a barrier for rank 0)
        two = subprocess.run([*TWO, "-m", "psr.cli", "iterate", "--config", str(TINY), "--run", str(run)], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert two.returncode != 0 and two.stderr.count("is in use") >= 2, two.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # the holder was killed: its lock went with it
        with pytest.raises(RunLocked):
            RunLock(run).acquire()  # and a lock held in this same process refuses a second taker too


def test_run_lock_without_file_system_locks_judges_by_the_holder(tmp_path, monkeypatch):
    import errno
    import fcntl

    from psr.runlock import RunLock, RunLocked

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    RunLock(tmp_path).acquire().release()  # its holder is gone: stale, taken over
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(RunLocked, match="has no locks"):
        RunLock(tmp_path).acquire()


def test_slurm_scripts_requeue_kill_on_bad_exit_and_activate_the_environment(tmp_path):
    fake_bin, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_bin.mkdir()
    for name in ("srun", "accelerate"):  # stand-ins that say how they were called and in which environment
        (venv / "bin" / name).write_text(f'#!/bin/bash\necho "{name} $* | $PSR_ACTIVE | $PSR_DIST_TIMEOUT"\n')
        (venv / "bin" / name).chmod(0o755)
    (fake_bin / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-node-01\\ngpu-node-02\\n'\n")
    (fake_bin / "scontrol").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PSR_ACTIVE=yes PATH="{venv / "bin"}:$PATH"\n')
    env = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin", "PSR_VENV": str(venv), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[01-02]", "SLURM_SUBMIT_DIR": str(ROOT)}
    env.pop("PSR_DIST_TIMEOUT", None)
    srun = "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1"
    for script, args, ran in (("multinode.sbatch", ["c.yaml"], srun),
                              ("stage.sbatch", ["c.yaml", "search"], "accelerate")):
        text = (ROOT / "recipes" / "slurm" / script).read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
        out = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / script), *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(ran) and out.stdout.rstrip().endswith("| yes | 10800"), out.stdout
    env["PSR_VENV"] = str(tmp_path / "none")  # no environment to activate and none active: a clear message
    out = subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "stage.sbatch"), "c.yaml", "search"], env=env,
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "make setup or set PSR_VENV" in out.stderr


# ---- item 7: training stages resume from their checkpoints -------------------------------------------
@pytest.fixture()
def pairs_file(tmp_path):
    from psr.models import load_tokenizer
    from psr.train.step_dpo import oracle_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(load_tokenizer("tiny-random"), 8, seed=5)))
    return path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_killed_training_stage_resumes_from_its_last_checkpoint(tmp_path, pairs_file):
    from transformers import TrainerCallback

    from psr.train.common import partial_dir
    from psr.train.step_dpo import StepDPOConfig, run_train

    class KilledAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    settings = dict(model="tiny-random", pairs=str(pairs_file), batch_size=2, max_steps=4, save_steps=2,
                    learning_rate=1e-3, beta=0.1, progress=False, report_to=[], seed=0)
    class Saves(TrainerCallback):
        steps = []

        def on_save(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    straight = tmp_path / "straight"
    run_train(StepDPOConfig(out=str(straight), **settings), callbacks=[Saves()])
    assert Saves.steps == [2]  # none after the last step: the model is saved right then anyway
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_train(StepDPOConfig(out=str(killed), **settings), callbacks=[KilledAtStep3()])
    assert sorted(p.name for p in partial_dir(killed).glob("checkpoint-*")) == ["checkpoint-2"]  # limit 1 kept
    log = run_train(StepDPOConfig(out=str(killed), **{**settings, "logging_steps": 2}))  # cosmetic: still resumes
    assert log["timing"]["steps"] == 2  # steps 3 and 4 only
    assert [h["step"] for h in log["log_history"] if "loss" in h][:2] == [1, 2]  # steps 1-2 from the checkpoint
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)  # as if never killed
    assert not partial_dir(killed).exists() and not list(killed.glob("checkpoint-*"))
    assert not (killed / "psr_resume.json").exists()

    # A checkpoint of other training (another config, other pairs) is never resumed: the stage starts over.
    with pytest.raises(KeyboardInterrupt):
        run_train(StepDPOConfig(out=str(killed), **settings), callbacks=[KilledAtStep3()])
    log = run_train(StepDPOConfig(out=str(killed), **{**settings, "learning_rate": 2e-3}))
    assert log["timing"]["steps"] == 4
    from psr.rounds import changed_keys

    assert changed_keys({"train": {"save_steps": 50}}, {"train": {"save_steps": 10}}) == []  # the loop accepts it


# ---- item 5: no EOS after a step, whatever TRL does -------------------------------------------------
def test_trl_pinned_to_the_tested_range_and_eos_after_a_step_refused(tmp_path, pairs_file):
    import trl
    from packaging.specifiers import SpecifierSet
    from trl import DPOTrainer

    from psr.files import DataError
    from psr.train.step_dpo import TESTED_TRL, StepDPOConfig, StepDPOTrainer, build_trainer

    assert f'"{TESTED_TRL}"' in (ROOT / "pyproject.toml").read_text()  # the pin is the tested range
    assert trl.__version__ in SpecifierSet(TESTED_TRL.removeprefix("trl"))

    cfg = StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(tmp_path / "m"), batch_size=2, max_steps=1,
                        progress=False, report_to=[], save_steps=0)

    class RenamedInTRL(StepDPOTrainer):  # what a TRL that no longer calls _prepare_dataset amounts to
        _prepare_dataset = DPOTrainer._prepare_dataset

    with pytest.raises(RuntimeError, match=r"did not tokenise the pairs through StepDPOTrainer\._prepare_dataset"):
        build_trainer(cfg, trainer_class=RenamedInTRL)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    rows[3]["chosen"] += "<|im_end|>"  # a step whose text ends in the EOS token
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"1 of 8 step pairs end in EOS after tokenisation \(the first: training row 3"):
        build_trainer(StepDPOConfig(**{**cfg.__dict__, "pairs": str(bad)}))


# ---- item 4: every stage starts clean after DeepSpeed training --------------------------------------
def test_fresh_state_forgets_the_deepspeed_zero3_config_a_training_stage_left(monkeypatch):
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from psr.distributed import fresh_state
    from psr.train.step_dpo import StepDPOConfig

    for key, value in (("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"),
                       ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true")):  # what accelerate launch sets for ZeRO-3
        monkeypatch.setenv(key, value)
    args = StepDPOConfig(save_steps=0).trainer_arguments()  # as a training stage builds it, before its model
    assert is_deepspeed_zero3_enabled()  # from here on every from_pretrained in the process would be sharded
    fresh_state()
    assert not is_deepspeed_zero3_enabled() and args is not None


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_training_then_search_then_eval_on_two_processes(tmp_path, zero):
    """The loop under DeepSpeed on 2 CPU processes: SFT -> eval -> search -> step-DPO -> eval. Under ZeRO-3
    the evaluation after training hung before every stage started clean (rank 0 loaded the model through
    zero.Init alone). DeepSpeed compiles a helper on first use (TORCH_EXTENSIONS_DIR, about 2 minutes)."""
    import shutil

    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("DeepSpeed needs a C++ compiler")
    from psr.config import from_dict
    from psr.evaluate import evaluate
    from psr.rounds import BenchmarkConfig, model_of

    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(eval_m0=False, rounds=1)
    cfg["benchmarks"][0].update(chunk_size=1)
    cfg["search"]["chunk_size"] = 1
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "psr-tests" / "torch_extensions"))
    run = tmp_path / "run"
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(ROOT / "accelerate_configs" / f"deepspeed_zero{zero}.yaml"), "--num_processes", "2", "--mixed_precision",
          "no", str(ROOT / "recipes" / "iterate.py"), "--config", str(recipe), "--run", str(run)],
         env={**ENV, "TORCH_EXTENSIONS_DIR": extensions}, timeout=1200)
    ids = ["init/init", "init/eval", "psr/round_1/search", "psr/round_1/train", "psr/round_1/eval"]
    assert [json.loads(m.read_text())["stage"] for m in sorted(run.rglob("*.done"), key=lambda m: m.stat().st_mtime)] \
        == ids
    assert json.loads((run / "init" / "model" / "train_log.json").read_text())["world_size"] == 2
    bench = from_dict(BenchmarkConfig, cfg["benchmarks"][0])
    for stage in (run / "init", run / "psr" / "round_1"):
        merged = json.loads((stage / "eval_arithmetic.json").read_text())
        assert [r["problems"] for r in merged["throughput"]["ranks"]] == [2, 2]
        # both ranks evaluated whole models: the same outputs as the saved model evaluated here, alone
        alone = evaluate(bench.eval_config(model_of(stage), 0, str(tmp_path / "alone.json")), progress=False)
        assert [r["output"] for r in merged["problems"]] == [r["output"] for r in alone["problems"]]
