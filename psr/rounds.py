"""The iterative loop: M0 -> init (SFT) -> M1 -> per round: search -> train (step-DPO) -> eval -> M(n+1).

A run is one folder (``runs/NAME``) holding its config and one folder per stage group:

    m0/eval.json                         the starting model, evaluated
    init/model/  init/eval.json          M1 (SFT on IFT + EFT data), evaluated
    psr/round_1/{search.jsonl, pairs.jsonl, model/, eval.json}   M2, and so on; srlm/round_1/... likewise

Every stage writes its artifacts atomically and then a ``<stage>.done`` marker (JSON). Started
again with the same command, the loop skips finished stages and continues at the first
unfinished one; the search also resumes inside the stage, chunk by chunk. A changed config is
accepted only where no finished stage used the changed keys; ``--restart-from STAGE`` redoes STAGE
and every later one, so a change that only they use is accepted with it (:func:`check_config_change`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from psr.config import ConfigError, check_at_least, cosmetic_key, from_dict, to_dict
from psr.disjoint import check_disjoint, round_offset
from psr.distributed import broadcast, context, fresh_state, gpu_memory, past_stop_time
from psr.engines import GenerationConfig
from psr.evaluate import EvalConfig, evaluate
from psr.files import (
    DataError,
    check_safetensors,
    read_json,
    read_jsonl,
    remove_partial_writes,
    write_json_atomic,
    write_text_atomic,
)
from psr.hub import HubConfig, pending, push_stage
from psr.judge_eval import JudgeEvalConfig, judge_eval
from psr.models import ModelOptions, model_options
from psr.search import SearchConfig, run_search
from psr.tasks import TaskConfig
from psr.trackers import check_report_to, log_stage
from psr.train.sft import InitConfig
from psr.train.step_dpo import StepDPOConfig


@dataclass
class BenchmarkConfig(EvalConfig):
    """One held-out benchmark evaluated after every stage that makes a model: ``psr eval``'s settings
    (``sampling`` for maj@k, ``dtype``, ...) with a name; the loop sets the model and the output."""

    model: str | None = None  # set by the loop: the model of each stage
    max_new_tokens: int = 256  # per solution
    seed: int | None = None  # null: the run's seed
    out: str | None = None  # set by the loop: <stage folder>/eval_<name>.json
    name: str = "arithmetic"  # names the result files (eval_<name>.json) and the report's columns
    test_time_search: bool = False  # also solve with the step-wise search + own judge at inference (paper Table 5)
    test_time_limit: int | None = None  # problems for the test-time search (default: limit)

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "test_time_limit")
        if self.model is not None or self.out is not None:
            raise ValueError(f"benchmark {self.name}: model and out are set by the loop; leave them out")

    def eval_config(self, model: str, seed: int, out: str, generation: GenerationConfig | None = None) -> EvalConfig:
        """The ``psr eval`` config of this benchmark for one model (on the run's engine, when given)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig)}
        return EvalConfig(**{**shared, "model": model, "seed": seed if self.seed is None else self.seed, "out": out,
                             "generation": generation or self.generation})


@dataclass
class RunConfig(ModelOptions):
    """``psr iterate``: a whole run, M0 -> init (M1) -> rounds of search -> step-DPO -> eval, per method."""

    name: str = "run"  # the run's folder is runs/<name> unless --run says otherwise
    model: str = "smollm2-135m"  # M0: built-in name, local directory or hub id
    seed: int = 0  # the run's one seed: init's seed and data_seed, training, eval; search: seed + 1000 * round
    rounds: int = 2  # rounds of search -> train -> eval per method
    # the arms, each from the same M1: psr; srlm (outcome-based baseline); oracle (PSR's search judged by
    # the task's step check: a control arm)
    methods: list[Literal["psr", "srlm", "oracle"]] = field(default_factory=lambda: ["psr"])
    problems_per_round: int = 32  # search problems per round (new problems every round)
    task: TaskConfig = field(default_factory=TaskConfig)  # where the search's problems come from
    init: InitConfig = field(default_factory=InitConfig)  # model/out/task/seed/data_seed are set by the loop
    # an M1 you already have (directory or hub id, e.g. one `psr init` made): the run does not train one,
    # its rounds start from this model (init's settings are then unused)
    m1: str | None = None
    # model/out/task/limit/seed/round/method are set by the loop
    search: SearchConfig = field(default_factory=SearchConfig)
    train: StepDPOConfig = field(default_factory=StepDPOConfig)  # model/out/pairs/seed: set by the loop
    # held-out benchmarks, evaluated after every stage that makes a model (on the command line: a YAML list)
    benchmarks: list[BenchmarkConfig] = field(default_factory=lambda: [BenchmarkConfig()])
    judge_eval_limit: int = 100  # held-out step pairs for the judge's accuracy (built-in arithmetic task)
    eval_m0: bool = True  # evaluate the starting model too
    # per-round metrics (accuracy per benchmark, judge accuracy, pairs, ties, answer shares), one step per
    # model, to these trackers: tensorboard (<run>/tensorboard/rounds/<method>), wandb. Training stages have
    # their own (train.report_to, init.report_to)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    hub: HubConfig = field(default_factory=HubConfig)  # publish each model (with a card) and the data (off)
    # the engine of every stage that generates or judges (search, SRLM, evaluation, test-time search, judge
    # eval); the loop sets it on each of them. Training is HF's either way. vllm needs `make setup-vllm`
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        check_at_least(self, 0, "rounds", "judge_eval_limit")
        check_at_least(self, 1, "problems_per_round")
        if len({b.name for b in self.benchmarks}) != len(self.benchmarks):
            raise ValueError("benchmark names must be unique")
        check_report_to(self.report_to)
        check_loop_sets(self)
        self._check_context()

    def _check_context(self) -> None:
        """A completion budget as long as the whole context would make every prompt too long (psr.lengths):
        refused when the config is read, not after hours of stages that count everything as too_long."""
        limit = self.generation.max_model_len
        if limit is None:
            return
        budgets = {f"benchmarks[{b.name}].max_new_tokens": b.max_new_tokens for b in self.benchmarks}
        budgets["search.max_step_tokens"] = self.search.max_step_tokens
        budgets["search.srlm.max_new_tokens"] = self.search.srlm.max_new_tokens
        if self.search.judge.mode == "generate":
            budgets["search.judge.max_new_tokens"] = self.search.judge.max_new_tokens
        for key, n in budgets.items():
            if n >= limit:
                raise ValueError(f"{key} is {n}, but generation.max_model_len is {limit}: no prompt would fit "
                                 "beside it; raise max_model_len or lower the budget")


# Fields of the stage blocks that the loop sets on every stage, and from what: a value given for one would be
# stored in config.yaml and then overwritten, so it is refused at load, naming who sets it.
LOOP_SETS = {
    "init": {"model": "model (M0)", "out": "the run folder (init/model)", "task": "task", "seed": "seed",
             "data_seed": "seed", "judge_template": "search.judge.template"},
    "search": {"model": "each round's start model", "task": "task", "split": "the loop (train)",
               "method": "methods", "limit": "problems_per_round", "data_seed": "seed (one stream of problems)",
               "seed": "seed (+ 1000 x round)", "round": "the round", "out": "the run folder",
               "generation": "generation"},
    "train": {"model": "each round's start model", "pairs": "the round's search", "out": "the run folder",
              "seed": "seed"},
}
for _owned in LOOP_SETS.values():  # every stage loads its models with the run's options
    _owned.update({k: k for k in ("revision", "trust_remote_code", "attn_implementation")})


def check_loop_sets(cfg: RunConfig) -> None:
    """ValueError for a stage field the loop sets itself (:data:`LOOP_SETS`) given a non-default value."""
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(RunConfig) if f.name in LOOP_SETS}
    for block, owned in LOOP_SETS.items():
        for name, who in owned.items():
            if getattr(getattr(cfg, block), name) != getattr(defaults[block], name):
                raise ValueError(f"{block}.{name} is set by the loop from {who}; leave it out of psr iterate's config")
    for i, b in enumerate(cfg.benchmarks):
        for name, default in (("generation", GenerationConfig()), *dataclasses.asdict(ModelOptions()).items()):
            if getattr(b, name) != default:
                raise ValueError(f"benchmarks[{i}].{name} is set by the loop from {name}; leave it out")


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
def run_dir_of(stage_dir: Path) -> Path:
    """The run folder of a stage folder (``m0``, ``init`` or ``<method>/round_<r>``, see :func:`plan`)."""
    return stage_dir.parent.parent if stage_dir.name.startswith("round_") else stage_dir.parent


def in_run(path: str | Path, run_dir: Path) -> str:
    """How a marker stores a model path: relative to the run folder (so the folder can be moved, or
    resumed from another directory); a path outside the run folder is stored absolute."""
    if not Path(path).exists():
        return str(path)  # a model name, not a folder
    rel = os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())
    return str(Path(path).resolve()) if rel == ".." or rel.startswith(".." + os.sep) else rel


def resolve_in_run(stored: str, run_dir: Path) -> str:
    """A model path from a marker, as this process can open it: relative to the run folder; older
    markers held it relative to where the run was started (``../runs/K3/init/model``), which is
    tried as is and then by its tail inside the run folder (a run folder moved since)."""
    path = Path(stored)
    if not path.is_absolute() and (run_dir / path).is_dir():
        return str(run_dir / path)
    if path.is_dir():
        return stored
    for k in range(1, len(path.parts)):
        if (run_dir / Path(*path.parts[k:])).is_dir():
            return str(run_dir / Path(*path.parts[k:]))
    return stored  # not a folder: a model name (a hub id or a built-in one)


def model_of(stage_dir: Path) -> str:
    """The model a finished train/init stage produced (a round without pairs keeps its start model)."""
    for kind in ("train", "init"):
        marker = stage_dir / f"{kind}.done"
        if marker.exists():
            return resolve_in_run(read_json(marker)["model"], run_dir_of(stage_dir))
    raise FileNotFoundError(f"no finished model stage in {stage_dir}")


def _options(cfg: RunConfig) -> dict:
    """The run's model options (revision, trust_remote_code, attn_implementation), set on every stage."""
    return dataclasses.asdict(model_options(cfg))


def eval_stage(cfg: RunConfig, model_dir_of, out_dir: Path, rank: int):
    def run():
        # Every rank evaluates its share of each benchmark (and of its test-time search); rank 0 merges
        # them and judges the held-out pairs (short) while the others wait, then writes eval.json.
        from psr.distributed import device_for
        from psr.engines import load_generator, loads_together, release

        model_name = model_dir_of()
        loaded = {}  # the model (or engine) in the dtype the current benchmark asks for: one at a time
        summary = {"model": model_name, "benchmarks": {}}

        def load(dtype):
            # One engine at a time: a vLLM engine takes gpu_memory_utilization of the GPU, so a second one
            # (a benchmark with its own dtype) cannot start beside the first; it is released first.
            if dtype not in loaded:
                for model, _ in loaded.values():
                    release(model)
                loaded.clear()
                loaded[dtype] = load_generator(model_name, dtype, device_for(rank), cfg.generation, options=cfg)
            return loaded[dtype]

        for b in cfg.benchmarks:
            model, tok = load(b.dtype)
            r = evaluate(b.eval_config(model_name, cfg.seed, str(out_dir / f"eval_{b.name}.json"), cfg.generation),
                         model, tok)
            tts = None
            if b.test_time_search:
                scfg = dataclasses.replace(cfg.search, model=model_name, task=b.task, split=b.split,
                                           limit=b.test_time_limit or b.limit, offset=b.offset, method="psr",
                                           seed=cfg.seed, out=str(out_dir / f"tts_{b.name}"),
                                           generation=cfg.generation)
                tts = run_search(scfg, model, tok)
            if rank != 0:
                continue  # rank 0 summarises; every rank goes on to the judge's engine and the release below
            entry = {k: v for k, v in r.items() if k not in ("problems", "config", "made_by")}
            outputs = [p["output"] for p in r["problems"]]
            entry["mean_steps"] = sum(p["n_steps"] for p in r["problems"]) / max(1, len(outputs))
            entry["mean_step_chars"] = sum(len(o) for o in outputs) / max(1, sum(p["n_steps"] for p in r["problems"]))
            if tts is not None:
                entry["test_time_search_accuracy"] = tts["final_accuracy"]
            summary["benchmarks"][b.name] = entry
        if cfg.judge_eval_limit:
            # Rank 0 alone judges (short). Under a launcher a vLLM engine is built collectively (external
            # launcher), so every rank builds the judge's engine with it, or none does: rank 0 alone would wait
            # in vLLM's setup for ranks that wait at the stage's barrier.
            if rank == 0 or loads_together(cfg.generation):
                model, tok = load(None)
            if rank == 0:
                task = cfg.task if cfg.task.name == "arithmetic" else TaskConfig()
                jcfg = JudgeEvalConfig(model=model_name, task=task, limit=cfg.judge_eval_limit,
                                       judge=cfg.search.judge, seed=cfg.seed, out=str(out_dir / "judge_eval.json"),
                                       generation=cfg.generation)
                j = judge_eval(jcfg, model, tok)
                summary["judge"] = {k: v for k, v in j.items() if k not in ("pairs", "config")}
        for model, _ in loaded.values():  # every rank closes its own engine
            release(model)
        loaded.clear()
        if rank != 0:
            return {}
        write_json_atomic(out_dir / "eval.json", summary)
        return {"model": in_run(model_name, run_dir_of(out_dir))}

    return run


def init_config(cfg: RunConfig, out: Path):
    """The init stage's InitConfig: the run's model, task, seed and options; its judge template; and its engine
    for init's own search (unless ``init.eft_search.generation`` says otherwise)."""
    icfg = dataclasses.replace(cfg.init, model=cfg.model, out=str(out), task=cfg.task, seed=cfg.seed,
                               data_seed=cfg.seed, judge_template=cfg.search.judge.template, **_options(cfg))
    if icfg.eft_search.generation == GenerationConfig():
        icfg = dataclasses.replace(icfg, eft_search=dataclasses.replace(icfg.eft_search, generation=cfg.generation))
    return icfg


def init_stage(cfg: RunConfig, run_dir: Path):
    out = run_dir / "init" / "model"

    def run():
        from psr.train.sft import run_init

        if cfg.m1 is not None:  # checked up front by check_m1
            return {"model": in_run(cfg.m1, run_dir), "given": True}
        log = run_init(init_config(cfg, out))
        return {"model": in_run(out, run_dir), "seconds_per_step": log.get("seconds_per_step")}

    return run


def search_stage(cfg: RunConfig, method: str, r: int, start_dir: Path, out_dir: Path):
    def run():
        search = cfg.search
        if method == "oracle":  # the same search and pairs, judged by the task's exact step check
            search = dataclasses.replace(search, judge=dataclasses.replace(search.judge, mode="truth"))
        scfg = dataclasses.replace(search, model=model_of(start_dir), task=cfg.task, split="train",
                                   method="srlm" if method == "srlm" else "psr",
                                   limit=cfg.problems_per_round, offset=round_offset(cfg, r), data_seed=cfg.seed,
                                   seed=cfg.seed + 1000 * r, round=r,
                                   out=str(out_dir), generation=cfg.generation, **_options(cfg))
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
            return {"model": in_run(start, run_dir_of(out_dir)), "skipped": "no pairs in this round"}
        tcfg = dataclasses.replace(cfg.train, model=start, pairs=str(out_dir / "pairs.jsonl"),
                                   out=str(out_dir / "model"), seed=cfg.seed, **_options(cfg))
        log = run_train(tcfg)
        return {"model": in_run(out_dir / "model", run_dir_of(out_dir)),
                "seconds_per_step": log.get("seconds_per_step")}

    return run


def plan(cfg: RunConfig, run_dir: Path, rank: int = 0) -> list[Stage]:
    """Every stage of the run, in order."""
    stages = []
    if cfg.eval_m0:
        m0 = run_dir / "m0"
        stages.append(Stage("m0/eval", "eval", m0, eval_stage(cfg, lambda: cfg.model, m0, rank)))
    init_dir = run_dir / "init"
    stages.append(Stage("init/init", "init", init_dir, init_stage(cfg, run_dir)))
    stages.append(Stage("init/eval", "eval", init_dir, eval_stage(cfg, lambda: model_of(init_dir), init_dir, rank)))
    for method in cfg.methods:
        start = init_dir
        for r in range(1, cfg.rounds + 1):
            d = run_dir / method / f"round_{r}"
            stages.append(Stage(f"{method}/round_{r}/search", "search", d, search_stage(cfg, method, r, start, d)))
            stages.append(Stage(f"{method}/round_{r}/train", "train", d, train_stage(cfg, start, d, rank)))
            stages.append(Stage(f"{method}/round_{r}/eval", "eval", d,
                                eval_stage(cfg, lambda d=d: model_of(d), d, rank)))
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


def _cosmetic(key: str) -> bool:
    """Reporting settings (psr.config.COSMETIC_KEYS), the hub block (where a run is published) and the run's
    name: never a config change."""
    return key == "name" or key.startswith("hub.") or cosmetic_key(key)


def changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _cosmetic(k))


def _kinds_reading(key: str, cfgs: list[RunConfig]) -> set[str] | None:
    """The kinds of stage whose result depends on config ``key`` directly (None: every stage)."""
    top, _, rest = key.partition(".")
    judged = any(c.judge_eval_limit for c in cfgs)  # eval stages judge with search.judge on task's pairs
    searched = any(b.test_time_search for c in cfgs for b in c.benchmarks)  # eval stages run the search
    if top in ("init", "train"):
        return {top}
    if top == "m1":
        return {"init"}
    if top == "problems_per_round":
        return {"search"}
    if top in ("benchmarks", "judge_eval_limit", "eval_m0"):
        return {"eval"}
    if top == "generation":  # another engine samples other candidates (its own random streams); training is HF's
        return {"search", "eval"}
    if top == "search":
        return {"search", "eval"} if searched or (judged and rest.startswith("judge.")) else {"search"}
    if top == "task":
        return {"init", "search", "eval"} if judged else {"init", "search"}
    return None  # model, seed, rounds, methods: the whole plan


def _stage_reads(key: str, stage: Stage, kinds: set[str] | None) -> bool:
    """Whether ``stage`` depends on config ``key``: its kind reads it, except the search settings an arm never
    reads (the oracle's search is judged by the task, not search.judge; only SRLM samples with search.srlm)."""
    if kinds is not None and stage.kind not in kinds:
        return False
    method = stage.id.split("/")[0]
    if stage.kind == "search" and key.startswith("search.judge.") and method == "oracle":
        return False
    if stage.kind == "search" and key.startswith("search.srlm.") and method != "srlm":
        return False
    return True


def check_config_change(old: dict, cfg: RunConfig, stages: list[Stage], restart_from: str | None) -> list[str]:
    """Compare the stored config of a run with the new one; returns the changed keys it accepts.

    A changed key is accepted when no finished stage used it: none from the first stage that reads
    it on (later stages build on that one's output) or, with ``--restart-from S``, none of those
    before S (S and every later stage are redone under the new config). Otherwise ConfigError names
    the keys and the first finished stage each one affects. Cosmetic keys (``progress``,
    ``report_to``, ...) never count; appending to ``methods`` adds stages after all others."""
    try:  # compare like with like: the stored config with today's defaults filled in
        old_cfg = from_dict(RunConfig, old)
        old = to_dict(old_cfg)
    except ConfigError:
        old_cfg = None
    new = to_dict(cfg)
    changed = changed_keys(old, new)
    if "methods" in changed and new["methods"][: len(old.get("methods") or [])] == old.get("methods"):
        changed.remove("methods")  # methods appended: their stages come after every existing one
    ids = [s.id for s in stages]
    stop = ids.index(restart_from) if restart_from is not None else len(stages)
    refused = []
    for key in changed:
        kinds = _kinds_reading(key, [c for c in (old_cfg, cfg) if c is not None])
        first = next((i for i, s in enumerate(stages) if _stage_reads(key, s, kinds)), len(stages))
        done = next((s.id for s in stages[first:stop] if s.done()), None)
        if done:
            refused.append((key, done))
    if refused:
        detail = "; ".join(f"{k} is used by finished stage {d}" for k, d in refused)
        raise ConfigError(
            f"the config of the run changed since its stages ran ({', '.join(k for k, _ in refused)}): {detail}; "
            f"start a new run (--run DIR) or redo from that stage with --restart-from STAGE")
    return changed


# ---------------------------------------------------------------------------------------------
# Resuming: are the finished stages' artifacts whole? Is there enough data?
# ---------------------------------------------------------------------------------------------
def _check_model_output(path: Path) -> None:
    from psr.models import check_model_dir

    if not path.is_dir():
        raise DataError(f"{path} is missing")
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():  # save_adapter: true
        read_json(path / "adapter_config.json")
        for shard in path.glob("*.safetensors"):
            check_safetensors(shard)
    else:
        check_model_dir(path)
    if (path / "train_log.json").exists():
        read_json(path / "train_log.json")


def _check_search_output(out: Path) -> None:
    for name in ("search.jsonl", "pairs.jsonl"):
        if not (out / name).exists():
            raise DataError(f"{out / name} is missing")
        read_jsonl(out / name)


def damaged(stage: Stage, cfg: RunConfig) -> str | None:
    """What is wrong with a finished stage's artifacts (the file named), or None when they are whole.
    Cheap checks: the marker and every JSON/JSONL file parse, model weights' headers are readable."""
    from psr.models import ModelLoadError

    try:
        info = read_json(stage.marker)
        if stage.kind in ("init", "train") and not info.get("skipped"):
            if not isinstance(info.get("model"), str):
                raise DataError(f"{stage.marker}: no model path in it")
            _check_model_output(Path(resolve_in_run(info["model"], run_dir_of(stage.dir))))
        elif stage.kind == "search":
            _check_search_output(stage.dir)
            read_json(stage.dir / "pair_stats.json")
        elif stage.kind == "eval":
            summary = read_json(stage.dir / "eval.json")
            missing = [b.name for b in cfg.benchmarks if b.name not in (summary.get("benchmarks") or {})]
            if missing:
                raise DataError(f"{stage.dir / 'eval.json'}: no result for benchmark {missing[0]}")
            for b in cfg.benchmarks:
                read_json(stage.dir / f"eval_{b.name}.json")
                if b.test_time_search:
                    _check_search_output(stage.dir / f"tts_{b.name}")
            if cfg.judge_eval_limit:
                read_json(stage.dir / "judge_eval.json")
    except (DataError, ModelLoadError) as err:
        return str(err)
    return None


def downstream(stages: list[Stage], i: int) -> list[Stage]:
    """Stage ``i`` and the finished stages built on its output: an eval stage feeds nothing; init
    feeds every later stage; a round's search or train feeds the later stages of its method."""
    s = stages[i]
    if s.kind == "eval":
        later = []
    elif s.id.startswith("init/"):
        later = stages[i + 1 :]
    else:
        method = s.id.split("/")[0] + "/"
        later = [t for t in stages[i + 1 :] if t.id.startswith(method)]
    return [s, *later]


def forget(stage: Stage, cfg: RunConfig, keep_chunks: bool = False) -> None:
    """Make a stage unfinished: its marker goes and, unless ``keep_chunks``, everything it would otherwise
    resume from: search chunks (its own, or its benchmarks' test-time searches'), evaluation chunks, a
    training's checkpoints, and init's IFT pass and EFT search."""
    stage.marker.unlink(missing_ok=True)
    if keep_chunks:
        return
    from psr.train.common import partial_dir

    caches = []
    if stage.kind == "search":
        caches = [stage.dir / "search_chunks"]
    elif stage.kind == "eval":
        caches = [stage.dir / f"tts_{b.name}" / "search_chunks" for b in cfg.benchmarks]
        caches += [stage.dir / f"eval_{b.name}.json.parts" for b in cfg.benchmarks]
    elif stage.kind == "init":
        caches = [stage.dir / "ift_pass", stage.dir / "eft_search", partial_dir(stage.dir / "ift_pass"),
                  partial_dir(stage.dir / "model")]
    elif stage.kind == "train":
        caches = [partial_dir(stage.dir / "model")]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)


def redo_damaged(stages: list[Stage], cfg: RunConfig, warn) -> list[str]:
    """Check every finished stage's artifacts; a damaged one is named (``warn``) and it and the
    stages built on it are made unfinished, so this start redoes them. Returns the ids redone."""
    redo: list[str] = []
    for i, stage in enumerate(stages):
        if not stage.done() or stage.id in redo:
            continue
        problem = damaged(stage, cfg)
        if problem is None:
            continue
        affected = [s for s in downstream(stages, i) if s.id not in redo and (s is stage or s.done())]
        later = f" and {len(affected) - 1} stage(s) built on it" if len(affected) > 1 else ""
        warn(f"warning: {problem}: redoing {stage.id}{later}")
        for s in affected:
            forget(s, cfg, keep_chunks=s is stage)  # its own chunks are checked one by one when it resumes
            redo.append(s.id)
    return redo


def check_m1(cfg: RunConfig) -> None:
    """A given M1 that cannot be found is refused before any stage runs (not after M0's evaluation)."""
    if cfg.m1 is None:
        return
    from psr.models import ModelLoadError, resolve_model_path

    try:
        resolve_model_path(cfg.m1)
    except ModelLoadError as err:
        raise ConfigError(f"m1: {err}") from None


def check_enough_problems(cfg: RunConfig) -> None:
    """A data file must hold a new set of problems for every round (round r searches from
    :func:`psr.disjoint.round_offset`); fewer rows is refused up front, naming the numbers."""
    if cfg.task.name == "arithmetic" or not cfg.methods or not cfg.rounds:
        return
    from psr.tasks import make_task

    have = len(make_task(cfg.task).all_problems())
    start, need = round_offset(cfg, 1), round_offset(cfg, cfg.rounds) + cfg.problems_per_round
    if have < need:
        raise DataError(f"{cfg.task.data} has {have} problems, but the rounds search rows {start}-{need - 1} "
                        f"(problems_per_round {cfg.problems_per_round} x rounds {cfg.rounds}, from row {start}, "
                        "after those init trains on): lower one of them or use a bigger file")


def read_stored_config(stored: Path) -> dict:
    """A run's ``config.yaml``; a damaged one is refused, naming it (it guards the finished stages)."""
    try:
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{stored}: damaged, cannot compare the config with it ({err}); restore it, or start "
                          "a new run (--run DIR)") from err
    if not isinstance(old, dict):
        raise ConfigError(f"{stored}: damaged (not a mapping); restore it, or start a new run (--run DIR)")
    return old


def _start_run(cfg: RunConfig, run_dir: Path, stages: list[Stage], restart_from: str | None, console) -> list[bool]:
    """Rank 0, at the start of a run: compare and store the config, forget the stages to redo (on purpose,
    or damaged); returns which stages are done, the decision every rank follows."""
    stored = run_dir / "config.yaml"
    if stored.exists():
        changed = check_config_change(read_stored_config(stored), cfg, stages, restart_from)
        if changed:
            console.print(f"config of {run_dir} changed: {', '.join(changed)} (no finished stage used them"
                          f"{' before ' + restart_from if restart_from else ''}); {stored} updated")
    if restart_from is not None:  # redo on purpose: forget this stage and every later one
        for s in stages[[s.id for s in stages].index(restart_from):]:
            forget(s, cfg)  # test-time-search chunks of its eval stages too
    redo_damaged(stages, cfg, lambda line: print(line, file=sys.stderr))
    for folder in {run_dir, *(s.dir for s in stages)}:  # writes a kill cut short (hidden temporary files)
        remove_partial_writes(folder)
    write_text_atomic(stored, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return [s.done() for s in stages]


def iterate(cfg: RunConfig, run_dir: str | Path | None = None, restart_from: str | None = None,
            stop_after: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) every unfinished stage; returns the run folder. A config that differs from
    the one stored in the run folder is checked by :func:`check_config_change`, then stored. The
    run folder is locked meanwhile (:mod:`psr.runlock`): a second loop on it stops with a message."""
    from psr.distributed import broadcast
    from psr.runlock import RunLock, RunLocked

    run_dir = Path(run_dir or Path("runs") / cfg.name)
    rank = context()[0]
    lock, refused = None, None
    if rank == 0:  # one lock per run: rank 0 takes it for every process of this launch
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as err:
            refused = str(err)
    refused = broadcast(refused)  # every rank stops, not only rank 0 (the others would wait at a barrier)
    if refused:
        raise RunLocked(refused)
    try:
        return _iterate(cfg, run_dir, restart_from, stop_after, progress)
    finally:
        if lock is not None:
            lock.release()


def _iterate(cfg: RunConfig, run_dir: str | Path | None = None, restart_from: str | None = None,
             stop_after: str | None = None, progress: bool = True) -> Path:
    from rich.console import Console

    console = Console(stderr=True)
    rank, world, barrier = context()
    run_dir = Path(run_dir or Path("runs") / cfg.name)
    stages = plan(cfg, run_dir, rank)
    ids = [s.id for s in stages]
    if restart_from is not None and restart_from not in ids:
        raise ConfigError(f"--restart-from {restart_from!r}: no such stage; stages are: {', '.join(ids)}")
    check_enough_problems(cfg)
    check_m1(cfg)
    check_disjoint(cfg)

    # Rank 0 decides what is done and tells the others. Each rank looking at the markers itself, right after
    # rank 0 deleted some (--restart-from, a damaged artifact), could see a cached marker on NFS and run
    # another stage than the rest: the ranks would meet at different collectives.
    decision = None
    if rank == 0:
        try:
            decision = {"done": _start_run(cfg, run_dir, stages, restart_from, console)}
            for done in pending(stages) if cfg.hub.push else []:  # a push an earlier start could not make
                push_stage(cfg, run_dir, done.id, done.dir)
        except (ConfigError, DataError) as err:
            decision = {"error": (type(err), str(err))}
    decision = broadcast(decision)
    if "error" in decision:
        kind, message = decision["error"]
        raise kind(message)
    finished = dict(zip(ids, decision["done"]))
    if stop_after and all(finished[s.id] for s in stages if s.kind == stop_after):
        # Without this, a second `--stop-after init` on a run whose init is done would run every later stage.
        if rank == 0:
            console.print(f"--stop-after {stop_after}: every {stop_after} stage of {run_dir} is done; nothing to run")
        return run_dir

    for n, stage in enumerate(stages, 1):
        if finished[stage.id]:
            continue
        if broadcast(past_stop_time()):  # rank 0's clock: all ranks stop before the same stage
            from psr.distributed import Preempted

            raise Preempted(f"PSR_STOP_AT has passed: stopping before {stage.id}; the same command resumes it")
        if rank == 0:
            console.rule(f"[bold]stage {n}/{len(stages)}: {stage.id}")
        started = time.perf_counter()
        stage.dir.mkdir(parents=True, exist_ok=True)
        fresh_state()  # nothing an earlier stage left in this process (DeepSpeed's config) changes this one
        memory = {"before": gpu_memory()}
        info = stage.run() or {}
        fresh_state()
        memory["after"] = gpu_memory()  # what the stage did not hand back (rank 0's GPU; None on a CPU)
        barrier()
        if rank == 0:
            seconds = round(time.perf_counter() - started, 1)
            if memory["after"] is not None:
                info["gpu_memory"] = memory
            write_json_atomic(stage.marker, {**info, "stage": stage.id, "seconds": seconds,
                                             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
            if stage.kind == "eval":  # one step per model on the trackers' curves; published when hub.push
                log_stage(run_dir, cfg.name, cfg.report_to, stage.id, cfg.methods)
                push_stage(cfg, run_dir, stage.id, stage.dir)
        barrier()
        if stop_after and stage.kind == stop_after:
            break
    if rank == 0 and all(s.done() for s in stages):  # rank 0's own view: it wrote every marker
        from psr.report import summary_table, write_report

        report = write_report(run_dir)
        print(summary_table(run_dir))
        print(f"report: {report}")
    return run_dir

