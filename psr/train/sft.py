"""Initialisation M0 -> M1 (``psr init``): SFT on IFT + EFT data with TRL's SFTTrainer.

- **IFT** (instruction fine-tuning): prompt = the rendered question (chat template, assistant turn
  open), completion = the step-formatted solution (``Step 1: ...`` lines, answer in ``\\boxed{}``);
  TRL appends EOS, which is right here: the solution ends the answer.
- **EFT** (evaluation fine-tuning): prompt = the judge prompt (``psr.judge.judge_messages``: question,
  steps so far, candidates A and B) with the assistant turn open; completion =
  ``psr.judge.judge_reply(verdict, justification)``, i.e. ``Verdict: [[A]]`` (optionally after a
  short justification). Correct-first and correct-second examples are exactly balanced.

From the built-in arithmetic task both are generated with exact truth (reference step vs a
corrupted step: wrong result / operation / operand, skipped step). From files:

- IFT JSONL, one object per line, any of: ``{"question", "answer"}`` (GSM8K style, gold after
  ``####``; each line of the reasoning becomes a step), ``{"question", "steps": [...]}``, or
  ``{"prompt", "completion"}`` (raw text, used as is: render the prompt yourself).
- EFT JSONL: ``{"question", "previous_steps": [...], "step_a", "step_b", "verdict": "A"|"B"}`` and
  optionally ``"justification"``.

The loss covers completion tokens only (TRL's ``completion_only_loss``).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from psr.build_eft import BuildEFTConfig
from psr.chunks import made_by
from psr.files import read_json
from psr.judge import JUDGE_PROMPT, judge_messages, judge_reply
from psr.steps import STEP_MARKER_RE, format_solution, render_prompt, step_prefix
from psr.tasks import DataError, TaskConfig, make_task
from psr.tasks.arithmetic import CORRUPTIONS, EQUATION_RE, ArithmeticTask
from psr.tasks.jsonl import check_text_field, gsm8k_reference_steps, read_rows
from psr.train.common import (
    TrainSettings,
    batch_plan,
    build_trainer_arguments,
    load_for_training,
    lora_config,
    prepare_output,
    resume_point,
    stage_callbacks,
    train_and_save,
)

WHY_WRONG = {
    "wrong_result": "its arithmetic is wrong",
    "wrong_operation": "it applies the wrong operation",
    "wrong_operand": "it uses a number that is not in the problem at this point",
    "skipped_step": "it skips a step of the problem",
    "wrong_stop": "it gives the answer before the last step, or goes on instead of giving it",
}


@dataclass
class InitConfig(TrainSettings):
    """``psr init``: M0 -> M1. Paper (7B): 3 epochs, lr 1e-6, batch 32, full fine-tuning."""

    trainer_config: ClassVar[str] = "trl:SFTConfig"

    task: TaskConfig = field(default_factory=TaskConfig)
    ift_examples: int | None = 400  # built-in task: how many to generate; files: a limit (null = all rows)
    eft_examples: int | None = 400  # judge examples: built-in task: how many to generate; files: a limit
    ift_data: str | None = None  # JSONL (or hub id for GSM8K-style rows) instead of the task's own solutions
    eft_data: str | None = None  # JSONL of judge examples instead of generated ones
    eft_justification: bool = False  # off: the reply is just "Verdict: [[X]]" (what logits-mode judging reads)
    eft_both_orders: bool = False  # each generated pair twice, (good, bad) and (bad, good)
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))  # kinds of wrong step in generated EFT
    # mixed: IFT and EFT rows shuffled together. grouped: every batch is all IFT or all EFT, and an EFT
    # pair's two orders share a batch, so a pure position bias gets no net gradient (batch order shuffled).
    batching: Literal["mixed", "grouped"] = "mixed"
    data_seed: int = 0  # which problems and corruptions are generated, and the order of the rows
    # the judge prompt EFT rows are written in (default psr.judge.JUDGE_PROMPT); the loop sets it to
    # search.judge.template, so the judge is trained on the prompt it is asked with
    judge_template: str | None = None
    # where the EFT rows come from. corruptions: the built-in task's reference steps vs corrupted copies;
    # file: eft_data; search: psr build-eft on the model's own candidate steps, annotated (the paper's way).
    # Default: file when eft_data is set, else corruptions.
    eft_source: Literal["corruptions", "file", "search"] | None = None
    # search: the build-eft settings (its model, task, seed, template and out are set by init)
    eft_search: BuildEFTConfig = field(default_factory=BuildEFTConfig)
    # search: whose candidates are annotated. ift_pass: M0 + SFT on the IFT rows alone first (M0 may not
    # keep the step format); start: the starting model as it is
    eft_search_model: Literal["ift_pass", "start"] = "ift_pass"
    # search with ift_pass: M1 = M0 + SFT on IFT + EFT (m0), or the IFT pass + SFT on the EFT rows (ift_pass)
    init_from: Literal["m0", "ift_pass"] = "m0"
    learning_rate: float = 1e-5
    epochs: float = 3.0

    def trainer_arguments(self):
        return sft_args(self)

    def __post_init__(self):
        super().__post_init__()
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad or not self.corruptions:
            raise ValueError(f"corruptions: choose from {list(CORRUPTIONS)}, got {self.corruptions}")
        if self.batching == "grouped" and self.eft_both_orders and self.batch_size % 2:
            raise ValueError("batching: grouped with eft_both_orders needs an even batch_size "
                             "(both orders in one batch)")
        for name in ("ift_examples", "eft_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (or null)")
        if self.init_from == "ift_pass" and (self.eft_source != "search" or self.eft_search_model != "ift_pass"):
            raise ValueError("init_from: ift_pass needs eft_source: search and eft_search_model: ift_pass")


# ---- IFT --------------------------------------------------------------------------------------
def _numbered(steps: list[str]) -> list[str]:
    return [s.strip() if STEP_MARKER_RE.match(s.strip()) else step_prefix(i + 1) + s.strip()
            for i, s in enumerate(steps)]


def read_ift_file(path: str, tokenizer, limit: int | None = None) -> list[dict]:
    rows = []
    for lineno, row in read_rows(path):
        where = f"{path}:{lineno}"
        if "prompt" in row or "completion" in row:
            for fld in ("prompt", "completion"):
                check_text_field(row, fld, where, "prompt/completion rows need both")
            rows.append({"prompt": row["prompt"], "completion": row["completion"], "source": "file"})
        else:
            check_text_field(row, "question", where,
                             "IFT rows: question + answer, question + steps, or prompt + completion")
            if "steps" in row:
                steps = row["steps"]
                if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
                    raise DataError(f"{where}: field 'steps' must be a non-empty list of strings")
                steps = _numbered(row["steps"])
            elif "answer" in row:
                check_text_field(row, "answer", where)
                if "####" not in row["answer"]:
                    raise DataError(f"{where}: field 'answer' has no '#### <answer>' line (GSM8K style) "
                                    "to take the gold from")
                steps = gsm8k_reference_steps(row["answer"])
            else:
                raise DataError(f"{where}: missing field 'answer' (or 'steps')")
            rows.append({"prompt": render_prompt(tokenizer, row["question"].strip()),
                         "completion": format_solution(steps), "question": row["question"].strip(), "source": "file"})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def build_ift(cfg: InitConfig, tokenizer) -> list[dict]:
    """IFT rows ``{"prompt", "completion", ...}`` from ``cfg.ift_data`` or the task's reference solutions."""
    if cfg.ift_data:
        return read_ift_file(cfg.ift_data, tokenizer, cfg.ift_examples)
    n = cfg.ift_examples
    if n == 0:
        return []
    task = make_task(cfg.task)
    problems = task.problems("train", n, seed=cfg.data_seed)
    rows = []
    for p in problems:
        if not p.reference_steps:
            raise DataError(f"task {cfg.task.name} has no step-formatted reference solutions: give ift_data "
                            "(question/answer, question/steps or prompt/completion rows)")
        rows.append({"prompt": render_prompt(tokenizer, p.question), "completion": format_solution(p.reference_steps),
                     "problem_id": p.id, "question": p.question, "source": cfg.task.name})
    return rows


# ---- EFT --------------------------------------------------------------------------------------
def justification(good_pos: str, good: str, kind: str | None) -> str:
    bad_pos = "B" if good_pos == "A" else "A"
    eq = EQUATION_RE.findall(good.replace(",", ""))
    why_good = f"it computes {eq[-1][0]} {eq[-1][1]} {eq[-1][2]} = {eq[-1][3]} correctly" if eq else "it is correct"
    why_bad = WHY_WRONG.get(kind or "", "it is wrong")
    return f"Candidate {good_pos} is right: {why_good}. Candidate {bad_pos} is wrong: {why_bad}."


def eft_example(tokenizer, question: str, previous: list[str], step_a: str, step_b: str, verdict: str,
                why: str | None = None, with_justification: bool = False, template: str | None = None,
                **meta) -> dict:
    prompt = tokenizer.apply_chat_template(judge_messages(question, previous, step_a, step_b, template or JUDGE_PROMPT),
                                           add_generation_prompt=True, tokenize=False)
    return {"prompt": prompt, "completion": judge_reply(verdict, why if with_justification else None),
            "question": question, "previous_steps": list(previous), "step_a": step_a, "step_b": step_b,
            "verdict": verdict, **meta}


def generate_eft(task: ArithmeticTask, tokenizer, n: int, seed: int = 0, corruptions=CORRUPTIONS,
                 both_orders: bool = False, with_justification: bool = False, split: str = "train",
                 template: str | None = None) -> list[dict]:
    """``n`` judge examples with exact truth: at a random step k of a problem, its reference step
    against a corrupted one, the right one shown first in exactly half of them."""
    n_pairs = (n + 1) // 2 if both_orders else n
    rng = random.Random(f"eft-{split}-{seed}")
    firsts = [i < (n_pairs + 1) // 2 for i in range(n_pairs)]  # the right step as A in half the pairs
    rng.shuffle(firsts)
    rows = []
    for pair, good_first in zip(task.step_pairs(split, n_pairs, seed + 1, rng, kinds=corruptions), firsts):
        p, good, bad = pair.problem, pair.chosen, pair.rejected
        for first in ([True, False] if both_orders else [good_first]):
            a, b, verdict = (good, bad, "A") if first else (bad, good, "B")
            rows.append(eft_example(tokenizer, p.question, pair.previous_steps, a, b, verdict,
                                    justification(verdict, good, pair.kind), with_justification, template,
                                    problem_id=p.id,
                                    step_index=pair.step_index, corruption=pair.kind, source="arithmetic"))
    return rows[:n]


def read_eft_file(path: str, tokenizer, limit: int | None = None, with_justification: bool = False,
                  template: str | None = None) -> list[dict]:
    rows = []
    for lineno, row in read_rows(path):
        where = f"{path}:{lineno}"
        for fld in ("question", "step_a", "step_b"):
            check_text_field(row, fld, where, "EFT rows: question, previous_steps, step_a, step_b, verdict")
        prev = row.get("previous_steps", [])
        if not isinstance(prev, list) or not all(isinstance(s, str) for s in prev):
            raise DataError(f"{where}: field 'previous_steps' must be a list of strings")
        if row.get("verdict") not in ("A", "B"):
            raise DataError(f"{where}: field 'verdict' must be \"A\" or \"B\", got {row.get('verdict')!r}")
        why = row.get("justification")
        if why is not None and not isinstance(why, str):
            raise DataError(f"{where}: field 'justification' must be a string")
        if with_justification and not (why or "").strip():
            raise DataError(f"{where}: missing field 'justification' (eft_justification is on)")
        rows.append(eft_example(tokenizer, row["question"], prev, row["step_a"], row["step_b"], row["verdict"], why,
                                with_justification, template, source="file"))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def build_eft(cfg: InitConfig, tokenizer) -> list[dict]:
    """EFT rows from ``cfg.eft_data`` or generated from the built-in task."""
    if eft_source(cfg) == "file":
        if not cfg.eft_data:
            raise DataError("eft_source: file needs eft_data (a JSONL of judge examples)")
        if cfg.eft_examples == 0:
            return []
        return read_eft_file(cfg.eft_data, tokenizer, cfg.eft_examples, cfg.eft_justification, cfg.judge_template)
    n = 400 if cfg.eft_examples is None else cfg.eft_examples
    if n == 0:
        return []
    task = make_task(cfg.task)
    if not isinstance(task, ArithmeticTask):
        raise DataError(f"EFT data for task {cfg.task.name} needs eft_data (a JSONL of judge examples): only the "
                        "built-in arithmetic task knows which steps are right; or set eft_examples: 0")
    return generate_eft(task, tokenizer, n, cfg.data_seed, cfg.corruptions, cfg.eft_both_orders, cfg.eft_justification,
                        template=cfg.judge_template)


# ---- training ---------------------------------------------------------------------------------
def order_rows(cfg: InitConfig, ift: list[dict], eft: list[dict]) -> list[dict]:
    """Training order. ``mixed``: one shuffled list (the trainer shuffles again). ``grouped``: rows cut
    into batches of one kind, in generation order (an EFT pair's two orders are adjacent), then the
    batches shuffled; the trainer keeps this order (sequential sampler), and each process of a
    data-parallel run takes whole batches."""
    rng = random.Random(cfg.data_seed)
    if cfg.batching == "mixed":
        rows = ift + eft
        rng.shuffle(rows)
        return rows
    ift = ift[:]
    rng.shuffle(ift)
    b = batch_plan(cfg)[0]  # the per-device batch this launch trains with (global_batch_size may lower it)
    full = [rows[i:i + b] for rows in (ift, eft) for i in range(0, len(rows) - len(rows) % b, b)]
    rng.shuffle(full)
    tail = eft[len(eft) - len(eft) % b:] + ift[len(ift) - len(ift) % b:]  # partial batches last: the rest stay aligned
    return [r for batch in full for r in batch] + tail


def sft_args(cfg: InitConfig):
    from trl import SFTConfig

    extra = {"train_sampling_strategy": "sequential"} if cfg.batching == "grouped" else {}
    return build_trainer_arguments(cfg, SFTConfig, max_length=cfg.max_length, completion_only_loss=True, packing=False,
                                   **extra)


def build_trainer(cfg: InitConfig, callbacks: list | None = None):
    """The configured SFTTrainer plus the IFT and EFT rows it trains on."""
    from datasets import Dataset
    from trl import SFTTrainer

    args = sft_args(cfg)  # before the model: DeepSpeed ZeRO-3 must see the config first
    model, tok = load_for_training(cfg.model, cfg)
    ift, eft = build_ift(cfg, tok), build_eft(cfg, tok)
    if not ift and not eft:
        raise DataError("no training data: ift_examples and eft_examples are both 0")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in order_rows(cfg, ift, eft)]
    resume = resume_point(cfg, rows)  # before the trainer: it may clear the partial directory
    timer, callbacks = stage_callbacks(cfg, callbacks)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora_config(cfg), callbacks=callbacks)
    trainer.psr_timer, trainer.psr_data, trainer.psr_resume = timer, {"ift": ift, "eft": eft}, resume
    return trainer


def eft_source(cfg: InitConfig) -> str:
    return cfg.eft_source or ("file" if cfg.eft_data else "corruptions")


def ift_from_task(cfg: InitConfig) -> int:
    """How many of the task's problems, from the first, the IFT rows are made of (0 with ``ift_data``)."""
    if cfg.ift_data or cfg.ift_examples == 0:
        return 0
    if cfg.ift_examples is None:  # as build_ift reads it: the task's default (arithmetic: 100), a file: every row
        return 100 if cfg.task.name == "arithmetic" else 10**9
    return cfg.ift_examples


def eft_search_offset(cfg: InitConfig) -> int:
    """Where the EFT search's problems start: after the IFT problems when both come from the task, so that the
    judge never learns from candidates of a policy fine-tuned on those very solutions."""
    return cfg.eft_search.offset + ift_from_task(cfg)


def task_problems_used(cfg: InitConfig) -> int:
    """How many of the task's problems (from the first) init trains on: the rounds search after them."""
    used = ift_from_task(cfg)
    if eft_source(cfg) == "search":
        used = max(used, eft_search_offset(cfg) + (cfg.eft_search.limit or 0))
    return used


# InitConfig fields the IFT pass (IFT rows only) does not read
EFT_ONLY_FIELDS = ("eft_examples", "eft_data", "eft_justification", "eft_both_orders", "corruptions", "judge_template",
                   "eft_source", "eft_search", "eft_search_model", "init_from")


def search_eft(cfg: InitConfig, callbacks: list | None = None) -> tuple[InitConfig, dict]:
    """``eft_source: search``: the IFT pass (if asked for), then build-eft with its candidates, next to
    ``cfg.out`` (``ift_pass/``, ``eft_search/``); each part is skipped when it is already there, so a
    killed init resumes. Returns the config that trains M1 on the built file, and the build's stats."""
    from psr.build_eft import run_build_eft
    from psr.models import model_options

    base = Path(cfg.out).parent
    searcher = cfg.model
    if cfg.eft_search_model == "ift_pass":
        ift_dir = base / "ift_pass"
        ift_only = dataclasses.replace(cfg, eft_source="corruptions", eft_examples=0, out=str(ift_dir), max_steps=-1)
        # reused only when the same settings and starting model made it (train_log.json is written last)
        # the fields that shape only the EFT rows or M1 do not make the IFT pass: an arm that changes its judge data
        # reuses it
        ift_settings = {k: v for k, v in dataclasses.asdict(ift_only).items() if k not in EFT_ONLY_FIELDS}
        stamp = made_by(ift_settings, cfg.model)
        made = read_json(ift_dir / "train_log.json").get("made_by") if (ift_dir / "train_log.json").exists() else None
        if made != stamp:
            if ift_dir.exists():
                print(f"note: {ift_dir} was made by another config or model; training the IFT pass again",
                      file=sys.stderr)
                shutil.rmtree(ift_dir)
            _train(ift_only, callbacks, {"made_by": stamp})
        searcher = str(ift_dir)
    out = base / "eft_search" / "eft.jsonl"
    stats = run_build_eft(dataclasses.replace(cfg.eft_search, model=searcher, task=cfg.task, seed=cfg.data_seed,
                                              offset=eft_search_offset(cfg), template=cfg.judge_template,
                                              out=str(out), **dataclasses.asdict(model_options(cfg))))
    if not stats["rows"]:
        print(f"init: build-eft found no right-vs-wrong pair in {stats['candidates']} candidates "
              f"({stats['labels']}); M1 trains on IFT rows only", file=sys.stderr)
    final = dataclasses.replace(cfg, eft_source="file", eft_data=str(out),
                                eft_examples=cfg.eft_examples if stats["rows"] else 0)
    if cfg.eft_search_model == "ift_pass" and cfg.init_from == "ift_pass":
        final = dataclasses.replace(final, model=searcher, ift_examples=0)
    return final, stats


def _train(cfg: InitConfig, callbacks: list | None = None, extra: dict | None = None) -> dict:
    prepare_output(cfg)
    trainer = build_trainer(cfg, callbacks)
    data = trainer.psr_data
    examples = {"ift": len(data["ift"]), "eft": len(data["eft"])}
    return train_and_save(cfg, trainer, {"examples": examples, **(extra or {})},
                          extra_files={"ift.jsonl": data["ift"], "eft.jsonl": data["eft"]})


def run_init(cfg: InitConfig, callbacks: list | None = None) -> dict:
    """Build the IFT + EFT sets, train, save M1 to ``cfg.out`` (atomically, with ``ift.jsonl``,
    ``eft.jsonl`` and ``train_log.json`` beside the weights); returns the training log. With
    ``eft_source: search`` the EFT rows are built first from the model's own search (``search_eft``)."""
    if eft_source(cfg) == "search":
        cfg, stats = search_eft(cfg, callbacks)
        log = _train(cfg, callbacks)
        log["eft_search"] = {k: v for k, v in stats.items() if k != "config"}
        return log
    return _train(cfg, callbacks)
