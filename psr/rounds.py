"""The iterative loop: M0 -> init (SFT) -> M1 -> per round: search -> train (step-DPO) -> eval -> M(n+1).

A run is one folder (``runs/NAME``) holding its config and one folder per stage group:

    m0/eval.json                         the starting model, evaluated
    init/model/  init/eval.json          M1 (SFT on IFT + EFT data), evaluated
    psr/round_1/{search.jsonl, pairs.jsonl, model/, eval.json}   M2, and so on; srlm/round_1/... likewise

Every stage writes its artifacts atomically and then a ``<stage>.done`` marker (JSON). Started
again with the same command, the loop skips finished stages and continues at the first
unfinished one; the search also resumes inside the stage, chunk by chunk. A changed config is
refused (naming the changed keys) once any stage is done, unless ``--restart-from`` says where
to redo from; only appending to ``methods`` is accepted as is (it adds stages after all the others).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from psr.config import ConfigError, from_dict, load_yaml, to_dict
from psr.distributed import context
from psr.evaluate import EvalConfig, evaluate
from psr.files import write_json_atomic, write_text_atomic
from psr.judge_eval import JudgeEvalConfig, judge_eval
from psr.search import SearchConfig, run_search
from psr.tasks import TaskConfig
from psr.train.sft import InitConfig
from psr.train.step_dpo import StepDPOConfig


@dataclass
class BenchmarkConfig:
    """One held-out benchmark evaluated after every stage that makes a model."""

    name: str = "arithmetic"
    task: TaskConfig = field(default_factory=TaskConfig)
    split: str = "test"
    limit: int | None = 100
    offset: int = 0  # gsm8k/math: skip rows used for training
    max_new_tokens: int = 256
    batch_size: int = 32
    samples: int = 0  # maj@k / pass@k
    test_time_search: bool = False  # also solve with the step-wise search + own judge at inference (paper Table 5)
    test_time_limit: int | None = None  # problems for the test-time search (default: limit)


@dataclass
class RunConfig:
    name: str = "run"
    model: str = "smollm2-135m"  # M0: built-in name, local directory or hub id
    seed: int = 0
    rounds: int = 2
    # each from the same M1; oracle: PSR's search with the task's step check as the judge (a control arm)
    methods: list[Literal["psr", "srlm", "oracle"]] = field(default_factory=lambda: ["psr"])
    problems_per_round: int = 32  # search problems per round (new problems every round)
    task: TaskConfig = field(default_factory=TaskConfig)  # where the search's problems come from
    init: InitConfig = field(default_factory=InitConfig)  # model/out/task/seed are set by the loop
    search: SearchConfig = field(default_factory=SearchConfig)  # model/out/task/limit/seed/round/method: set by the loop
    train: StepDPOConfig = field(default_factory=StepDPOConfig)  # model/out/pairs/seed: set by the loop
    benchmarks: list[BenchmarkConfig] = field(default_factory=lambda: [BenchmarkConfig()])
    judge_eval_limit: int = 100  # held-out step pairs for the judge's accuracy (built-in arithmetic task)
    eval_m0: bool = True

    def __post_init__(self):
        if self.rounds < 0 or self.problems_per_round < 1:
            raise ValueError("rounds must be >= 0 and problems_per_round >= 1")
        if len({b.name for b in self.benchmarks}) != len(self.benchmarks):
            raise ValueError("benchmark names must be unique")


@dataclass
class Stage:
    id: str  # e.g. "psr/round_1/search"
    kind: Literal["eval", "init", "search", "train"]
    dir: Path
    run: callable

    @property
    def marker(self) -> Path:
        return self.dir / f"{self.kind}.done"

    def done(self) -> bool:
        return self.marker.exists()


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def model_of(stage_dir: Path) -> str:
    """The model a finished train/init stage produced (a round without pairs keeps its start model)."""
    for kind in ("train", "init"):
        marker = stage_dir / f"{kind}.done"
        if marker.exists():
            return json.loads(marker.read_text())["model"]
    raise FileNotFoundError(f"no finished model stage in {stage_dir}")


def eval_stage(cfg: RunConfig, model_dir_of, out_dir: Path, rank: int):
    def run():
        if rank != 0:  # evaluation runs on the main process; the others wait at the barrier
            return {}
        from psr.models import load_model

        model_name = model_dir_of()
        model, tok = load_model(model_name)
        summary = {"model": model_name, "benchmarks": {}}
        for b in cfg.benchmarks:
            ecfg = EvalConfig(model=model_name, task=b.task, split=b.split, limit=b.limit, offset=b.offset,
                              batch_size=b.batch_size, max_new_tokens=b.max_new_tokens, samples=b.samples,
                              seed=cfg.seed, out=str(out_dir / f"eval_{b.name}.json"))
            r = evaluate(ecfg, model, tok)
            entry = {k: v for k, v in r.items() if k not in ("problems", "config")}
            outputs = [p["output"] for p in r["problems"]]
            entry["mean_steps"] = sum(p["n_steps"] for p in r["problems"]) / max(1, len(outputs))
            entry["mean_step_chars"] = sum(len(o) for o in outputs) / max(1, sum(p["n_steps"] for p in r["problems"]))
            if b.test_time_search:
                scfg = dataclasses.replace(cfg.search, model=model_name, task=b.task, split=b.split,
                                           limit=b.test_time_limit or b.limit, offset=b.offset, method="psr",
                                           seed=cfg.seed, out=str(out_dir / f"tts_{b.name}"))
                entry["test_time_search_accuracy"] = run_search(scfg, model, tok)["final_accuracy"]
            summary["benchmarks"][b.name] = entry
        if cfg.judge_eval_limit:
            j = judge_eval(JudgeEvalConfig(model=model_name, task=cfg.task if cfg.task.name == "arithmetic" else TaskConfig(),
                                           limit=cfg.judge_eval_limit, judge=cfg.search.judge, seed=cfg.seed,
                                           out=str(out_dir / "judge_eval.json")), model, tok)
            summary["judge"] = {k: v for k, v in j.items() if k not in ("pairs", "config")}
        write_json_atomic(out_dir / "eval.json", summary)
        return {"model": model_name}

    return run


def init_stage(cfg: RunConfig, run_dir: Path):
    out = run_dir / "init" / "model"

    def run():
        from psr.train.sft import run_init

        icfg = dataclasses.replace(cfg.init, model=cfg.model, out=str(out), task=cfg.task, seed=cfg.seed)
        log = run_init(icfg)
        return {"model": str(out), "seconds_per_step": log.get("seconds_per_step")}

    return run


def search_stage(cfg: RunConfig, method: str, r: int, start_dir: Path, out_dir: Path):
    def run():
        offset = (r - 1) * cfg.problems_per_round if cfg.task.name != "arithmetic" else 0
        search = cfg.search
        if method == "oracle":  # the same search and pairs, judged by the task's exact step check
            search = dataclasses.replace(search, judge=dataclasses.replace(search.judge, mode="truth"))
        scfg = dataclasses.replace(search, model=model_of(start_dir), task=cfg.task, split="train",
                                   method="srlm" if method == "srlm" else "psr",
                                   limit=cfg.problems_per_round, offset=offset, seed=cfg.seed + 1000 * r, round=r,
                                   out=str(out_dir))
        stats = run_search(scfg)
        return {"pairs": stats.get("pairs")}

    return run


def train_stage(cfg: RunConfig, start_dir: Path, out_dir: Path, rank: int):
    def run():
        from psr.files import read_jsonl
        from psr.train.step_dpo import run_train

        start = model_of(start_dir)
        if not read_jsonl(out_dir / "pairs.jsonl"):
            # Nothing to learn from: the round keeps its starting model and says so.
            return {"model": start, "skipped": "no pairs in this round"}
        tcfg = dataclasses.replace(cfg.train, model=start, pairs=str(out_dir / "pairs.jsonl"),
                                   out=str(out_dir / "model"), seed=cfg.seed)
        log = run_train(tcfg)
        return {"model": str(out_dir / "model"), "seconds_per_step": log.get("seconds_per_step")}

    return run


def plan(cfg: RunConfig, run_dir: Path, rank: int = 0) -> list[Stage]:
    """Every stage of the run, in order."""
    stages = []
    if cfg.eval_m0:
        stages.append(Stage("m0/eval", "eval", run_dir / "m0", eval_stage(cfg, lambda: cfg.model, run_dir / "m0", rank)))
    init_dir = run_dir / "init"
    stages.append(Stage("init/init", "init", init_dir, init_stage(cfg, run_dir)))
    stages.append(Stage("init/eval", "eval", init_dir, eval_stage(cfg, lambda: model_of(init_dir), init_dir, rank)))
    for method in cfg.methods:
        start = init_dir
        for r in range(1, cfg.rounds + 1):
            d = run_dir / method / f"round_{r}"
            stages.append(Stage(f"{method}/round_{r}/search", "search", d, search_stage(cfg, method, r, start, d)))
            stages.append(Stage(f"{method}/round_{r}/train", "train", d, train_stage(cfg, start, d, rank)))
            stages.append(Stage(f"{method}/round_{r}/eval", "eval", d, eval_stage(cfg, lambda d=d: model_of(d), d, rank)))
            start = d
    return stages


# ---------------------------------------------------------------------------------------------
# Config of a run: stored once, compared on every start
# ---------------------------------------------------------------------------------------------
def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def load_run_config(path: str | Path) -> RunConfig:
    data = load_yaml(path)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def iterate(cfg: RunConfig, run_dir: str | Path | None = None, restart_from: str | None = None,
            stop_after: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) every unfinished stage; returns the run folder."""
    from rich.console import Console

    console = Console(stderr=True)
    rank, world, barrier = context()
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    stages = plan(cfg, run_dir, rank)
    ids = [s.id for s in stages]
    if restart_from is not None and restart_from not in ids:
        raise ConfigError(f"--restart-from {restart_from!r}: no such stage; stages are: {', '.join(ids)}")

    stored = run_dir / "config.yaml"
    new = to_dict(cfg)
    if stored.exists() and restart_from is None and any(s.done() for s in stages):
        old = yaml.safe_load(stored.read_text())
        changed = changed_keys(old, new)
        if changed == ["methods"] and new["methods"][: len(old["methods"])] == old["methods"]:
            changed = []  # methods appended: their stages come after every existing one, nothing done is affected
        if changed:
            raise ConfigError(
                f"the config of run {run_dir} changed since its stages ran ({', '.join(changed)}); "
                f"start a new run (--run DIR) or redo from a stage with --restart-from STAGE")
    if rank == 0:
        if restart_from is not None:  # redo on purpose: forget this stage and every later one
            for s in stages[ids.index(restart_from):]:
                s.marker.unlink(missing_ok=True)
                if s.kind == "search":
                    shutil.rmtree(s.dir / "search_chunks", ignore_errors=True)
        write_text_atomic(stored, yaml.safe_dump(new, sort_keys=False))
    barrier()

    for n, stage in enumerate(stages, 1):
        if stage.done():
            continue
        if rank == 0:
            console.rule(f"[bold]stage {n}/{len(stages)}: {stage.id}")
        started = time.perf_counter()
        stage.dir.mkdir(parents=True, exist_ok=True)
        info = stage.run() or {}
        barrier()
        if rank == 0:
            write_json_atomic(stage.marker, {**info, "stage": stage.id, "seconds": round(time.perf_counter() - started, 1),
                                             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
        barrier()
        if stop_after and stage.kind == stop_after:
            break
    if rank == 0 and all(s.done() for s in stages):
        from psr.report import summary_table, write_report

        report = write_report(run_dir)
        print(summary_table(run_dir))
        print(f"report: {report}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    """``python recipes/iterate.py --config C``: the same as ``psr iterate --config C``."""
    from psr.cli import main as cli_main

    return cli_main(["iterate", *(sys.argv[1:] if argv is None else argv)])


def run_from_args(args) -> Path:
    return iterate(load_run_config(args.config), args.run, args.restart_from, args.stop_after)
