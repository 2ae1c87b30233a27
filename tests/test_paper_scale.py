"""What a paper-scale run on GPUs needs that a CPU can check (issue 29): memory handed back after training, a
clear error when an engine cannot fit, rank 0 deciding which stages are done (2 gloo processes), the global
batch split over 1/2/4/16 processes, artifacts that follow the umask, a full disk as one line naming the file
(a real 64 KiB tmpfs, as root), the run lock and the SLURM scripts on a requeued job, and a training stage that
stops with a checkpoint before the job's time limit."""

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT)}
TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture()
def pairs_file(tmp_path):
    from psr.models import load_tokenizer
    from psr.train.step_dpo import oracle_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(load_tokenizer("tiny-random"), 8, seed=5)))
    return path


def _settings(pairs_file, **kw):
    return dict(model="tiny-random", pairs=str(pairs_file), batch_size=2, max_steps=4, learning_rate=1e-3, beta=0.1,
                progress=False, report_to=[], seed=0, **kw)


# ---- memory handed back ------------------------------------------------------------------------------
def test_a_training_stage_hands_its_model_back_when_it_returns(tmp_path, pairs_file):
    import gc

    from transformers import TrainerCallback

    from psr.train.step_dpo import StepDPOConfig, run_train

    held = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            held["model"], held["optimizer"] = weakref.ref(model), weakref.ref(kwargs["optimizer"])

    gc.disable()  # only what the stage itself frees counts: a later collection would hide a leak until then
    try:
        run_train(StepDPOConfig(out=str(tmp_path / "m"), save_steps=0, **_settings(pairs_file)), callbacks=[Grab()])
        assert held["model"]() is None and held["optimizer"]() is None
    finally:
        gc.enable()


def test_an_engine_that_cannot_fit_is_one_line_naming_the_shortfall():
    from psr.engines.vllm_engine import memory_shortfall

    gib = 2**30
    assert memory_shortfall(70 * gib, 80 * gib, 0.85) is None
    msg = memory_shortfall(40 * gib, 80 * gib, 0.85, "cuda:3")
    assert msg.startswith("cuda:3: the vLLM engine needs 68.0 GiB") and "40.0 GiB are free, 28.0 GiB short" in msg
    assert "\n" not in msg


# ---- rank 0 decides what is done --------------------------------------------------------------------
def test_rank_zero_decides_which_stages_are_done(tmp_path):
    # Rank 1 sees every stage's marker (as an NFS client may, from its cache, right after rank 0 deleted them):
    # before, it skipped the evaluation rank 0 ran and rank 0 waited at its collectives until the timeout.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "r", "model": "tiny-random", "m1": "tiny-random", "rounds": 0, "eval_m0": False, "judge_eval_limit": 0,
        "benchmarks": [{"name": "arithmetic", "limit": 2, "chunk_size": 1, "max_new_tokens": 8}]}))
    probe = ("import sys\nfrom psr.distributed import context\nfrom psr.rounds import Stage\n"
             "if context()[0] == 1:\n    Stage.done = lambda self: True\n"
             "from psr.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    (tmp_path / "probe.py").write_text(probe)
    proc = subprocess.run([*TWO, str(tmp_path / "probe.py"), "iterate", "--config", str(recipe), "--run",
                           str(tmp_path / "run")], cwd=ROOT, env={**ENV, "PSR_DIST_TIMEOUT": "60"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "init" / "eval_arithmetic.json").read_text())
    assert [r["problems"] for r in result["throughput"]["ranks"]] == [1, 1]  # rank 1 evaluated its share


# ---- the global batch --------------------------------------------------------------------------------
def test_global_batch_size_is_the_same_on_any_number_of_processes(monkeypatch):
    from psr.config import ConfigError
    from psr.train.common import batch_line, batch_plan, trainer_kwargs
    from psr.train.step_dpo import StepDPOConfig

    cfg = StepDPOConfig(global_batch_size=32, batch_size=4)
    assert {w: batch_plan(cfg, w) for w in (1, 2, 4, 8, 16)} == {1: (4, 8), 2: (4, 4), 4: (4, 2), 8: (4, 1),
                                                                  16: (2, 1)}
    for world in (1, 2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        kw = trainer_kwargs(cfg)
        assert kw["per_device_train_batch_size"] * world * kw["gradient_accumulation_steps"] == 32
    assert batch_line(cfg, 2) == ("effective batch: 32 examples per optimizer step = 4 per device x 2 process(es) "
                                  "x 4 accumulation step(s)")
    with pytest.raises(ConfigError, match="global_batch_size 32 cannot be split over 64 processes"):
        batch_plan(cfg, 64)
    assert batch_plan(StepDPOConfig(batch_size=4), 16) == (4, 1)  # without it: per device, as before


def test_the_7b_recipes_state_a_global_batch_of_32():
    import yaml

    for name in ("config_psr.yaml", "config_srlm.yaml"):
        cfg = yaml.safe_load((ROOT / "recipes" / "qwen2.5-math-7b" / "iterate" / name).read_text())
        assert cfg["train"]["global_batch_size"] == 32 and cfg["init"]["global_batch_size"] == 32


# ---- files on a shared file system -------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_artifacts_follow_the_umask(tmp_path, mask):
    from psr.files import write_json_atomic

    old = os.umask(mask)
    try:
        path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real 64 KiB file system (tmpfs; needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)])


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_old_one(tiny_disk):
    from psr.files import DiskFull, write_text_atomic

    target = write_text_atomic(tiny_disk / "pairs.jsonl", "old\n")
    with pytest.raises(DiskFull, match=f"no space left on the device writing {target}"):
        write_text_atomic(target, "x" * 200_000)
    assert target.read_text() == "old\n" and [p.name for p in tiny_disk.iterdir()] == ["pairs.jsonl"]


def test_psr_commands_on_a_full_disk_end_in_one_line(tiny_disk, tmp_path, pairs_file):
    out = tiny_disk / "ift.jsonl"
    proc = subprocess.run([sys.executable, "-m", "psr.cli", "build-ift", "--task", "arithmetic", "--limit", "2000",
                           "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"no space left on the device writing {out}" in proc.stderr.strip().splitlines()[-1]
    model = tiny_disk / "model"
    proc = subprocess.run([sys.executable, "-m", "psr.cli", "train", "--model", "tiny-random", "--pairs",
                           str(pairs_file), "--out", str(model), "--max_steps", "1", "--batch_size", "2",
                           "--save_steps", "0", "--report_to", "[]", "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no space left on the device writing" in proc.stderr.strip().splitlines()[-1]
    assert not model.exists()  # nothing half-written stands as the finished model


def test_the_lock_accepts_the_same_slurm_job_requeued_on_another_host(tmp_path, monkeypatch):
    import errno
    import fcntl

    from psr.runlock import RunLock, RunLocked

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = tmp_path / ".lock"
    for flock_error in (errno.ENOLCK, errno.EWOULDBLOCK):  # no locks on this FS / a lease the dead node left
        def flock(fd, op, err=flock_error):
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(fcntl, "flock", flock)
        lock.write_text(json.dumps({"host": "gpu-node-07", "pid": 1, "job": "4242"}))
        RunLock(tmp_path).acquire().release()  # this job's own earlier run: taken over
        lock.write_text(json.dumps({"host": "gpu-node-07", "pid": 1, "job": "999"}))
        with pytest.raises(RunLocked, match="SLURM job 999"):
            RunLock(tmp_path).acquire()  # another job: refused


# ---- SLURM: requeue on the time limit ----------------------------------------------------------------
def _slurm_env(tmp_path, srun_body: str) -> dict:
    fake, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake.mkdir()
    for name in ("srun", "accelerate"):  # multinode.sbatch runs srun, stage.sbatch accelerate
        (venv / "bin" / name).write_text(f"#!/bin/bash\necho \"{name} PSR_STOP_AT=$PSR_STOP_AT\"\n{srun_body}\n")
    (fake / "scontrol").write_text(f"#!/bin/bash\nif [ \"$1\" = requeue ]; then echo \"$*\" >> {tmp_path}/requeued; "
                                   "else printf 'gpu-node-01\\n'; fi\n")
    (fake / "squeue").write_text("#!/bin/bash\necho 2030-01-01T12:00:00\n")
    for f in [*fake.iterdir(), *(venv / "bin").iterdir()]:
        f.chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    return {**os.environ, "PATH": f"{fake}:/usr/bin:/bin", "PSR_VENV": str(venv), "SLURM_NNODES": "1",
            "SLURM_JOB_NODELIST": "gpu-node-01", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242", "TZ": "UTC"}


def test_slurm_job_sets_a_stop_time_and_requeues_when_psr_stops_before_the_limit(tmp_path):
    script = ROOT / "recipes" / "slurm" / "multinode.sbatch"
    assert "#SBATCH --signal=B:USR1@" in script.read_text()
    env = _slurm_env(tmp_path, "exit 3")  # psr's exit status when it stopped itself with its state saved
    out = subprocess.run(["bash", str(script), "c.yaml"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    stop = int(out.stdout.split("PSR_STOP_AT=")[1].split()[0])
    assert stop == 1893499200 - 1200  # 2030-01-01T12:00:00 UTC less the 20-minute margin
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    (tmp_path / "requeued").unlink()
    env = _slurm_env(tmp_path / "b", "exit 1")  # a failure is not requeued
    out = subprocess.run(["bash", str(script), "c.yaml"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and not (tmp_path / "b" / "requeued").exists()


def test_slurm_job_requeues_on_the_time_limit_signal(tmp_path):
    env = _slurm_env(tmp_path, "exec sleep 60")
    proc = subprocess.Popen(["bash", str(ROOT / "recipes" / "slurm" / "stage.sbatch"), "c.yaml", "search"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends 5 minutes before the limit
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "time limit near" in err
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]


def test_training_saves_a_checkpoint_and_stops_at_the_stop_time_then_resumes(tmp_path, pairs_file, monkeypatch):
    from psr.distributed import Preempted
    from psr.train.common import partial_dir
    from psr.train.step_dpo import StepDPOConfig, run_train

    out = tmp_path / "m"
    monkeypatch.setenv("PSR_STOP_AT", str(time.time()))  # already past: stop after the first step
    with pytest.raises(Preempted, match="stopped at step 1"):
        run_train(StepDPOConfig(out=str(out), save_steps=0, **_settings(pairs_file)))
    assert not out.exists()
    assert [p.name for p in partial_dir(out).glob("checkpoint-*")] == ["checkpoint-1"]
    monkeypatch.delenv("PSR_STOP_AT")
    log = run_train(StepDPOConfig(out=str(out), save_steps=0, **_settings(pairs_file)))
    assert log["timing"]["steps"] == 3  # steps 2-4: resumed from the checkpoint, not from the start


def test_checkpoints_by_the_clock(tmp_path, pairs_file):
    from transformers import TrainerCallback

    from psr.train.step_dpo import StepDPOConfig, run_train

    class Saves(TrainerCallback):
        steps = []

        def on_save(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    run_train(StepDPOConfig(out=str(tmp_path / "m"), save_steps=0, save_every_hours=1e-9, **_settings(pairs_file)),
              callbacks=[Saves()])
    assert Saves.steps == [1, 2, 3]  # every step's hour has passed; none after the last (the model is saved then)


# ---- make gpu-check ------------------------------------------------------------------------------------
def test_gpu_check_refuses_without_cuda_and_its_runs_are_valid_configs(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run make gpu-check instead")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "gpu_check.py"), "--out", str(tmp_path / "gpu")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpu-check: needs a CUDA GPU and torch sees none here; nothing was run"]
    assert not (tmp_path / "gpu").exists()
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    runs = dict(gpu_check.run_configs("vllm"))
    assert runs["tiny"].rounds == 1 and runs["tiny"].generation.backend == "hf"
    assert runs["embedded"].generation.backend == "vllm" and runs["embedded"].methods == ["psr", "srlm"]
    assert runs["embedded"].generation.gpu_memory_utilization == 0.85  # a 7B run's share: memory must come back
    kept = {"before": {"allocated_gib": 1.0, "reserved_gib": 1.0}, "after": {"allocated_gib": 1.1, "reserved_gib": 9.0}}
    back = {"before": {"allocated_gib": 1.0, "reserved_gib": 1.0}, "after": {"allocated_gib": 1.0, "reserved_gib": 1.0}}
    assert gpu_check.memory_problems([{"stage": "psr/round_1/train", "gpu_memory": back}], 0.25) == []
    assert gpu_check.memory_problems([{"stage": "psr/round_1/train", "gpu_memory": kept}], 0.25) == [
        "psr/round_1/train: reserved 1.00 -> 9.00 GiB, 8.00 GiB not handed back"]
