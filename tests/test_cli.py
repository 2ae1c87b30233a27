"""The command line generated from the config dataclasses, the one loader behind it, and how a run
treats a changed config."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from psr.cli import COMMANDS, DEST, build_parser, config_class, main
from psr.config import ConfigError, from_dict, load_config
from psr.evaluate import EvalConfig
from psr.rounds import BenchmarkConfig, RunConfig, check_config_change, eval_stage, init_stage, iterate, plan
from psr.search import SearchConfig
from psr.train.step_dpo import StepDPOConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"


def leaf_fields(cls, prefix=""):
    """Dotted names of every field a command line can set (nested dataclasses flattened)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_fits_on_a_screen_and_help_all_lists_every_field_with_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    short = capsys.readouterr().out.splitlines()
    assert exit_.value.code == 0 and len(short) <= 45 and max(map(len, short)) <= 100
    assert "--help-all" in short[-1] and any(line.startswith("  --model") for line in short) == (command != "build-ift")
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help-all"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser([command])._subparsers._group_actions[0].choices[command]
    actions = {a.dest[len(DEST):]: a for a in sub._actions if a.dest.startswith(DEST)}
    names = list(leaf_fields(config_class(command)))
    assert len(names) > 10 and set(actions) == set(names)
    for name in names:
        flag = rf"(?<![\w.-])--{re.escape(name)}(?![\w.-])"
        assert re.search(flag, text), f"--{name} missing from psr {command} --help"
        doc = actions[name].help.split(" (default: ")[0]
        assert doc.strip(), f"psr {command} --{name} has no help text"


def test_iterate_takes_dotted_overrides_over_the_recipe(tmp_path):
    """psr iterate --config R --train.beta 0.2: the stored run config has it (stopped after init)."""
    run = tmp_path / "run"
    assert main(["iterate", "--config", str(TINY), "--run", str(run), "--stop-after", "init", "--no-eval-m0",
                 "--train.beta", "0.2", "--search.sampling.t0", "0.9", "--train.trl.optim", "adafactor",
                 "--init.trl", "{run_name: tiny-init}"]) == 0
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["train"]["beta"] == 0.2 and stored["train"]["trl"] == {"optim": "adafactor"}
    assert stored["search"]["sampling"]["t0"] == 0.9 and stored["search"]["sampling"]["policy"] == "edt"
    assert stored["init"]["trl"] == {"run_name": "tiny-init"}
    assert (run / "init" / "init.done").exists() and not (run / "init" / "eval.done").exists()
    # Again with init done: nothing of that kind is left, so it stops at once rather than running the rest.
    assert main(["iterate", "--config", str(TINY), "--run", str(run), "--stop-after", "init", "--no-eval-m0"]) == 0
    assert not (run / "init" / "eval.done").exists() and sorted(p.name for p in run.iterdir() if p.is_dir()) == ["init"]


def test_command_line_values_are_checked_like_the_file(tmp_path, capsys):
    assert main(["train", "--config", str(ROOT / "recipes/tiny/train/config_tiny.yaml"), "--beta", "high"]) == 2
    assert "command line: beta: expected a number, got 'high'" in capsys.readouterr().err
    assert main(["iterate", "--config", str(TINY), "--run", str(tmp_path), "--train.trl.optimm", "x"]) == 2
    assert "unknown key trl.optimm (not a field of trl's DPOConfig)" in capsys.readouterr().err
    assert main(["iterate", "--config", str(TINY), "--run", str(tmp_path), "--methods", "[psr, chess]"]) == 2
    assert "methods[1]: must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--widht", "3"])
    assert capsys.readouterr().err == ("psr search: error: unknown flag --widht; did you mean --width? "
                                       "(psr search --help)\n")
    with pytest.raises(SystemExit):
        main(["iterate", "--config", str(TINY), "--train.betta", "3"])
    assert "unknown flag --train.betta; did you mean --train.beta?" in capsys.readouterr().err
    assert main(["serch"]) == 2
    assert capsys.readouterr().err.startswith("psr: error: unknown command 'serch'; did you mean search?")
    bad = tmp_path / "bad.yaml"
    bad.write_text("limit: 3\nlimit: 4\n")  # PyYAML would keep the last one silently
    assert main(["eval", "--config", str(bad)]) == 2
    assert f"{bad}: key 'limit' appears twice (second time on line 2)" in capsys.readouterr().err
    bad.write_text("train:\n  beta: 0.1\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match="key 'beta' appears twice"):
        load_config(RunConfig, bad)


def test_partial_nested_block_keeps_the_enclosing_default(tmp_path):
    """search: {sampling: {t0: 0.9}} keeps SearchConfig's EDT policy (SamplingConfig alone defaults to greedy)."""
    assert from_dict(SearchConfig, {"sampling": {"t0": 0.9}}).sampling.policy == "edt"
    assert from_dict(EvalConfig, {"sampling": {"top_p": 0.9}}).sampling.temperature == 0.7
    recipe = tmp_path / "r.yaml"
    recipe.write_text("search:\n  sampling: {t0: 0.9}\n")
    cfg = load_config(RunConfig, recipe)
    assert (cfg.search.sampling.policy, cfg.search.sampling.t0) == ("edt", 0.9)


def test_trl_block_reaches_the_trainer_by_trls_names():
    cfg = from_dict(StepDPOConfig, {"epochs": 1, "trl": {"num_train_epochs": 3, "optim": "adafactor", "save_steps": 5,
                                                         "run_name": "r1", "log_level": "info"}})
    assert cfg.epochs == 3.0 and "num_train_epochs" not in cfg.trl  # TRL's name sets psr's field: one value
    args = cfg.trainer_arguments()
    got = (args.num_train_epochs, args.optim, args.save_steps, args.run_name, args.beta)
    assert got == (3.0, "adafactor", 5, "r1", 0.4)
    assert not from_dict(StepDPOConfig, {"trl": {"fp16": True}}).trainer_arguments().bf16
    with pytest.raises(ConfigError, match="trl: .*nope is not a valid"):
        from_dict(StepDPOConfig, {"trl": {"optim": "nope"}})
    with pytest.raises(ConfigError, match="trl.output_dir: set out"):
        from_dict(StepDPOConfig, {"trl": {"output_dir": "x"}})
    # TRL's push would upload the .partial folder and never the final model: the hub block does it
    with pytest.raises(ConfigError, match="trl.push_to_hub: set hub.push and hub.model_id in psr iterate"):
        from_dict(StepDPOConfig, {"trl": {"push_to_hub": True}})


def test_run_seed_sets_init_data_seed(tmp_path, monkeypatch):
    import psr.train.sft

    seen = {}
    monkeypatch.setattr(psr.train.sft, "run_init", lambda cfg: seen.setdefault("cfg", cfg) and {})
    template = "Q {question} {previous} {step_a} {step_b}"
    init_stage(from_dict(RunConfig, {"seed": 7, "search": {"judge": {"template": template}}}), tmp_path)()
    assert (seen["cfg"].seed, seen["cfg"].data_seed) == (7, 7)
    assert seen["cfg"].judge_template == template  # EFT rows are written in the judge's prompt


def test_benchmarks_are_eval_configs_and_keep_sampling(tmp_path, monkeypatch):
    import psr.models
    import psr.rounds

    assert {f.name for f in dataclasses.fields(EvalConfig)} <= {f.name for f in dataclasses.fields(BenchmarkConfig)}
    loads, evals = [], []
    monkeypatch.setattr(psr.models, "load_model", lambda name, dtype=None, **kw: loads.append(dtype) or (None, None))
    monkeypatch.setattr(psr.rounds, "evaluate", lambda cfg, m, t: evals.append(cfg) or {"problems": []})
    cfg = from_dict(RunConfig, {"seed": 3, "judge_eval_limit": 0, "benchmarks": [
        {"name": "a", "samples": 4, "sampling": {"temperature": 0.3}},
        {"name": "b", "dtype": "bfloat16", "seed": 11}]})
    eval_stage(cfg, lambda: "some/model", tmp_path, 0)()
    assert loads == [None, "bfloat16"]
    assert (evals[0].sampling.policy, evals[0].sampling.temperature, evals[0].samples) == ("fixed", 0.3, 4)
    assert type(evals[0]) is EvalConfig and evals[0].model == "some/model" and evals[0].seed == 3
    assert evals[1].seed == 11 and evals[0].out.endswith("eval_a.json")
    with pytest.raises(ConfigError, match="set by the loop"):
        from_dict(RunConfig, {"benchmarks": [{"name": "a", "model": "x"}]})


def _done(stages, *ids):
    for s in stages:
        if s.id in ids:
            s.dir.mkdir(parents=True, exist_ok=True)
            s.marker.write_text("{}")


def test_config_change_rule_with_and_without_restart(tmp_path):
    """A changed key is accepted when no finished stage used it (before --restart-from, when given)."""
    base = {"benchmarks": [{"name": "arithmetic", "limit": 4}]}  # no test-time search: eval stages do not search
    old = load_config(RunConfig, TINY, base)
    stored = dataclasses.asdict(old)
    stages = plan(old, tmp_path)
    _done(stages, "m0/eval", "init/init", "init/eval", "psr/round_1/search")

    def change(**kv):
        return load_config(RunConfig, TINY, {**base, **kv})

    # cosmetic keys never count; a key only unfinished stages use is accepted
    assert check_config_change(stored, change(**{"init.progress": True, "train.report_to": ["tensorboard"]}),
                               stages, None) == []
    assert check_config_change(stored, change(**{"train.beta": 0.3}), stages, None) == ["train.beta"]
    # a key a finished stage used is refused, naming it and the stage ...
    used = "search.width is used by finished stage psr/round_1/search"
    with pytest.raises(ConfigError, match=rf"\(search.width\).*{used}"):
        check_config_change(stored, change(**{"search.width": 4}), stages, None)
    # ... also when the restart point comes after that stage; accepted when the restart redoes it
    with pytest.raises(ConfigError, match="search.width is used by finished stage psr/round_1/search"):
        check_config_change(stored, change(**{"search.width": 4}), stages, "psr/round_1/train")
    assert check_config_change(stored, change(**{"search.width": 4}), stages, "psr/round_1/search") == ["search.width"]
    # the judge is also what eval stages measure: changing it needs a restart from the first eval
    with pytest.raises(ConfigError, match="search.judge.mode is used by finished stage m0/eval"):
        check_config_change(stored, change(**{"search.judge.mode": "generate"}), stages, "psr/round_1/search")
    with pytest.raises(ConfigError, match="used by finished stage init/init"):
        check_config_change(stored, change(**{"init.learning_rate": 1e-4}), stages, "init/eval")
    # with a test-time search the eval stages search too: every search key is used from m0/eval on
    tts = dataclasses.asdict(load_config(RunConfig, TINY))
    with pytest.raises(ConfigError, match="search.width is used by finished stage m0/eval"):
        check_config_change(tts, load_config(RunConfig, TINY, {"search.width": 4}), stages, "psr/round_1/search")
    # the oracle's search is judged by the task: a finished oracle arm does not hold the PSR arm's judge, and
    # only SRLM's stages read search.srlm (the judge_eval_limit: 0 run keeps the eval stages out of it)
    arms = {**base, "methods": ["oracle", "psr", "srlm"], "judge_eval_limit": 0}
    old_arms = load_config(RunConfig, TINY, arms)
    stages = plan(old_arms, tmp_path / "arms")
    _done(stages, "m0/eval", "init/init", "init/eval", "oracle/round_1/search", "oracle/round_1/train",
          "psr/round_1/search")
    judge = {**arms, "search.judge.tie_margin": 0.3}
    assert check_config_change(dataclasses.asdict(old_arms), load_config(RunConfig, TINY, judge), stages,
                               "psr/round_1/search") == ["search.judge.tie_margin"]
    with pytest.raises(ConfigError, match="search.judge.tie_margin is used by finished stage psr/round_1/search"):
        check_config_change(dataclasses.asdict(old_arms), load_config(RunConfig, TINY, judge), stages, None)
    srlm = {**arms, "search.srlm.samples": 2}
    assert check_config_change(dataclasses.asdict(old_arms), load_config(RunConfig, TINY, srlm), stages,
                               None) == ["search.srlm.samples"]
    # a stored config from before a new field existed compares equal once today's defaults fill it in
    del stored["train"]["trl"], stored["benchmarks"][0]["sampling"]
    assert check_config_change(stored, old, stages, None) == []


def test_iterate_stores_an_accepted_change(tmp_path, monkeypatch):
    import psr.report
    import psr.rounds

    monkeypatch.setattr(psr.report, "write_report", lambda run_dir: run_dir / "report.md")
    monkeypatch.setattr(psr.report, "summary_table", lambda run_dir: "")
    monkeypatch.setattr(psr.rounds, "damaged", lambda stage, cfg: None)  # the markers below are stand-ins
    run = tmp_path / "run"
    cfg = load_config(RunConfig, TINY, {"rounds": 1})
    stages = plan(cfg, run)
    _done(stages, *[s.id for s in stages])  # a finished run (pretend; nothing runs below)
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    iterate(load_config(RunConfig, TINY, {"rounds": 1, "train.progress": True}), run, progress=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["progress"] is True
    with pytest.raises(ConfigError, match="train.beta is used by finished stage psr/round_1/train"):
        iterate(load_config(RunConfig, TINY, {"rounds": 1, "train.beta": 0.3}), run, progress=False)


def test_help_block_or_word_lists_those_fields(capsys):
    with pytest.raises(SystemExit):
        main(["iterate", "--help", "train"])
    text = capsys.readouterr().out
    assert "--train.beta" in text and "--search.width" not in text and "--init.lora" not in text
    with pytest.raises(SystemExit):
        main(["iterate", "--help", "lora"])  # no block of that name: the fields whose name holds it
    text = capsys.readouterr().out
    assert "--init.lora_r" in text and "--train.lora" in text and "--train.beta" not in text
    with pytest.raises(SystemExit) as exit_:
        main(["iterate", "--help", "serch"])
    assert exit_.value.code == 2 and "no field matches 'serch'; did you mean --help search?" in capsys.readouterr().err


def test_iterate_refuses_what_the_loop_sets_naming_who(capsys):
    assert main(["iterate", "--config", str(TINY), "--train.model", "x"]) == 2
    assert capsys.readouterr().err == ("psr iterate: error: command line: train.model is set by the loop from each "
                                       "round's start model; leave it out of psr iterate's config\n")
    for flag, who in (("--search.limit", "problems_per_round"), ("--search.method", "methods"),
                      ("--init.seed", "seed")):
        assert main(["iterate", "--config", str(TINY), flag, "srlm" if "method" in flag else "9"]) == 2
        assert f"{flag[2:]} is set by the loop from {who}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].generation is set by the loop"):
        from_dict(RunConfig, {"benchmarks": [{"name": "a", "generation": {"backend": "vllm"}}]})
    for recipe in sorted(ROOT.glob("recipes/*/iterate/*.yaml")):  # every shipped recipe still loads
        load_config(RunConfig, recipe)


def test_a_bad_override_names_the_command_line_and_is_caught_at_load(tmp_path, capsys):
    # the file's own blocks were written into by the override, which then looked like the file's error
    assert main(["iterate", "--config", str(TINY), "--run", str(tmp_path), "--task.min_steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("psr iterate: error: command line: task: need 1 <= min_steps <= max_steps")
    assert err.count("\n") == 1
    assert not (tmp_path / "config.yaml").exists()  # refused at load, before any stage
    bad = tmp_path / "r.yaml"
    bad.write_text("task: {min_steps: 4, max_steps: 3}\n")
    assert main(["eval", "--config", str(bad), "--limit", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"psr eval: error: {bad}: task: need 1 <= min_steps")


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # 40 rounds: a run long enough that the signal surely lands while it runs, even on a loaded machine (the
    # tiny recipe's 2 rounds once finished before the test process was scheduled again)
    proc = subprocess.Popen([sys.executable, "-m", "psr.cli", "iterate", "--config", str(TINY), "--run",
                             str(tmp_path / "run"), "--report-to", "[]", "--rounds", "40"], env=env,
                            stderr=subprocess.PIPE, text=True,
                            # a test run started in the background inherits SIGINT ignored; Ctrl-C is not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "run" / "m0").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("psr iterate: interrupted; finished stages are kept: run the same command "
                                            "again to resume at the first unfinished one")
