"""Publish a run on the Hugging Face hub (``hub: {push: true}`` in ``psr iterate``; off by default).

Every model the run makes goes to ``<model_id>-<method>`` (one repo per arm, as alignment-handbook pushes
one repo per recipe): M1 to the branch ``m1``, the model after round r to ``round_<r>``, and ``main`` follows
the latest, each with a model card (base model, method, round, pair counts, the eval table of the chain so
far, the run's config). The run's data go to the dataset repo ``<dataset_id>`` with ``datasets``: configs
``ift`` and ``eft`` (what M1 was trained on) and ``pairs`` with one split per round (``psr_round_1``, ...);
``psr train --pairs <dataset_id>:pairs:psr_round_1`` and ``init.ift_data`` / ``init.eft_data`` read them back.

:func:`plan_pushes` decides what goes where (tested on local files); :func:`push` uploads it with
huggingface_hub and ``datasets`` (the real calls; no hub is reachable from the tests). A stage's pushes are
recorded in ``<stage dir>/hub.done``, so a failed push is retried on the next start and never repeated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from psr.files import read_jsonl, write_json_atomic

_REPO_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class HubConfig:
    """``psr iterate``'s hub block: where the run's models and data are published."""

    push: bool = False  # push every model the run makes (with a model card) and its data (IFT, EFT, pairs)
    # models' repos: <model_id>-<method> (org/name; null: your user name is not known offline, so it is required)
    model_id: str | None = None
    dataset_id: str | None = None  # the data's dataset repo (null: <model_id>-data)
    private: bool = True  # create the repos private
    push_data: bool = True  # also push IFT, EFT and each round's pairs as datasets

    def __post_init__(self):
        if self.push and not self.model_id:
            raise ValueError("hub.model_id is needed with hub.push (org/name; models go to <model_id>-<method>)")
        for key in ("model_id", "dataset_id"):
            value = getattr(self, key)
            if value is not None and not _REPO_RE.match(value):
                raise ValueError(f"hub.{key} must be a hub repo id like org/name, got {value!r}")

    @property
    def data_repo(self) -> str:
        return self.dataset_id or f"{self.model_id}-data"


@dataclass
class ModelPush:
    repo_id: str
    branch: str  # the model's own branch (m1, round_<r>); main follows the latest
    folder: Path
    card: str


@dataclass
class DataPush:
    repo_id: str
    config: str  # ift, eft, pairs
    split: str  # train, or <method>_round_<r> for pairs
    rows: list[dict]


def _eval_table(run_dir: Path, method: str | None, upto: int) -> str:
    """The report's summary rows of one chain, M0 .. M(upto) (upto: 1 = M1, r + 1 = after round r)."""
    from psr.report import collect, markdown_table, summary_rows

    rows = summary_rows(collect(run_dir))
    keep = [rows[0]]
    for row in rows[1:]:
        n = int(row[0][1:])
        if n <= upto and (n <= 1 or row[1].lower().startswith(f"{method} ")):
            keep.append(row)
    return markdown_table(keep)


def model_card(cfg, run_dir: Path, method: str, step: int, pairs: int | None) -> str:
    """The README.md of a pushed model: metadata for the hub, then what it is and how it was measured."""
    from huggingface_hub import ModelCard, ModelCardData

    round_ = "M1 (SFT on IFT + EFT data)" if step == 1 else f"round {step - 1} of {method.upper()} (step-wise DPO)"
    data = ModelCardData(base_model=cfg.model if _REPO_RE.match(cfg.model) else None, library_name="transformers",
                         tags=["psr", "trl", "step-dpo" if method != "srlm" else "dpo", "self-rewarding"],
                         datasets=[cfg.hub.data_repo] if cfg.hub.push_data else None)
    config = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    text = "\n".join([
        "---", data.to_yaml(), "---", "",
        f"# {cfg.hub.model_id}-{method}: M{step}", "",
        f"Made by [psr](https://arxiv.org/abs/2503.03746) (Process-based Self-Rewarding) from `{cfg.model}`: "
        f"{round_}, method `{method}`, round {step - 1}." if step > 1 else
        f"Made by psr (Process-based Self-Rewarding) from `{cfg.model}`: {round_}.", "",
        *([f"Trained on {pairs} step-level preference pairs the previous model made and judged itself.", ""]
          if pairs is not None else []),
        "## Evaluation (greedy accuracy per benchmark, judge accuracy on held-out step pairs)", "",
        _eval_table(run_dir, method, step), "",
        "## Config of the run", "", "```yaml", config.strip(), "```", ""])
    return ModelCard(text).content


def _model_dir(stage_dir: Path) -> Path | None:
    """The model folder a finished init/train stage wrote there (None: a round without pairs, or a given M1)."""
    folder = stage_dir / "model"
    return folder if (folder / "config.json").exists() or (folder / "adapter_config.json").exists() else None


def _skipped(stage_dir: Path) -> bool:
    from psr.files import read_json

    return bool(read_json(stage_dir / "train.done").get("skipped"))


def plan_pushes(cfg, run_dir: Path, stage_id: str) -> list[ModelPush | DataPush]:
    """What to publish once eval stage ``stage_id`` is done: its model (init/eval: M1 under every method),
    and (``push_data``) the data it was made from."""
    run_dir = Path(run_dir)
    group = stage_id.split("/")[0]
    if group == "m0":
        return []
    out: list[ModelPush | DataPush] = []
    if group == "init":
        folder = _model_dir(run_dir / "init")
        for method in cfg.methods:
            if folder is not None and cfg.m1 is None:
                out.append(ModelPush(f"{cfg.hub.model_id}-{method}", "m1", folder,
                                     model_card(cfg, run_dir, method, 1, None)))
        if cfg.hub.push_data and folder is not None:
            for name in ("ift", "eft"):
                if (folder / f"{name}.jsonl").exists():
                    out.append(DataPush(cfg.hub.data_repo, name, "train", read_jsonl(folder / f"{name}.jsonl")))
        return out
    r = int(stage_id.split("/")[1].split("_")[1])
    stage_dir = run_dir / group / f"round_{r}"
    pairs = read_jsonl(stage_dir / "pairs.jsonl") if (stage_dir / "pairs.jsonl").exists() else []
    folder = _model_dir(stage_dir)
    if folder is not None and (stage_dir / "train.done").exists() and not _skipped(stage_dir):
        out.append(ModelPush(f"{cfg.hub.model_id}-{group}", f"round_{r}", folder,
                             model_card(cfg, run_dir, group, r + 1, len(pairs))))
    if cfg.hub.push_data and pairs:
        out.append(DataPush(cfg.hub.data_repo, "pairs", f"{group}_round_{r}", pairs))
    return out


def dataset_of(rows: list[dict]):
    """A ``datasets.Dataset`` of rows (a JSONL file's): nested metadata kept as features."""
    from datasets import Dataset

    return Dataset.from_list(rows)


def push(items: list[ModelPush | DataPush], private: bool = True) -> list[str]:
    """Upload ``items`` (the real calls: huggingface_hub for models, ``datasets`` for data); returns
    ``repo@branch`` / ``repo:config:split`` of each."""
    from huggingface_hub import HfApi

    api, done = HfApi(), []
    for item in items:
        if isinstance(item, ModelPush):
            from huggingface_hub import ModelCard

            api.create_repo(item.repo_id, private=private, exist_ok=True)
            for branch in (item.branch, "main"):  # its own branch, and main follows the latest model
                if branch != "main":
                    api.create_branch(item.repo_id, branch=branch, exist_ok=True)
                # the card goes up on its own: a file added to the run's model folder would change the folder's
                # identity, which later stages' resume checks compare
                api.upload_folder(repo_id=item.repo_id, folder_path=str(item.folder), revision=branch,
                                  commit_message=f"psr: {item.branch}", ignore_patterns=["checkpoint-*", "README.md"])
                ModelCard(item.card).push_to_hub(item.repo_id, revision=branch, commit_message="psr: model card")
            done.append(f"{item.repo_id}@{item.branch}")
        else:
            dataset_of(item.rows).push_to_hub(item.repo_id, config_name=item.config, split=item.split,
                                              private=private)
            done.append(f"{item.repo_id}:{item.config}:{item.split}")
    return done


def push_stage(cfg, run_dir: Path, stage_id: str, stage_dir: Path) -> None:
    """Publish what eval stage ``stage_id`` finished, once (``hub.done`` records it); a failure is one line
    saying that the stages are kept and the next start retries the push."""
    marker = stage_dir / "hub.done"
    if not cfg.hub.push or marker.exists():
        return
    from psr.config import ConfigError

    items = plan_pushes(cfg, run_dir, stage_id)
    try:
        pushed = push(items, cfg.hub.private)
    except Exception as err:  # network, auth, quota: the user needs the cause, not a traceback
        raise ConfigError(f"hub push after {stage_id} failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          "finished stages are kept: run the same command again to retry the push") from err
    write_json_atomic(marker, {"pushed": pushed})


def pending(stages) -> list:
    """Finished eval stages whose push has not happened yet (an earlier start failed to push)."""
    return [s for s in stages if s.kind == "eval" and s.done() and not (s.dir / "hub.done").exists()
            and not s.id.startswith("m0/")]


