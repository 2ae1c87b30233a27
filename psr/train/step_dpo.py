"""Step-wise DPO (``psr train``): TRL's DPOTrainer on a round's ``pairs.jsonl``.

Each row's ``prompt`` is already rendered text (chat template with the assistant turn open, then
the previous steps, each ending in a newline); ``chosen``/``rejected`` are single steps. The loss is
standard DPO with log-probs summed over the step tokens only, and **no EOS after a step**: a step
is not the end of an answer. TRL 1.16's ``DPOTrainer._prepare_dataset`` appends EOS to every
plain-text completion with no option to turn it off, so :class:`StepDPOTrainer` overrides that one
method (tokenisation only; the loss, collator, reference handling and logging are TRL's).
Rows with ``kind: solution`` (whole solutions, the outcome-based SRLM baseline) do get EOS.

By default the file's ``prompt`` is used as written; ``prompt_from: render`` re-renders it from
``question`` + ``previous_steps`` with the training model's tokenizer (for pairs made by another
model family).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl import __version__ as trl_version

from psr.files import DataError, iter_jsonl
from psr.train.common import (
    SHARED_DATA_DIR,
    TrainSettings,
    build_trainer_arguments,
    load_for_training,
    lora_config,
    prepare_output,
    resume_point,
    stage_callbacks,
    train_and_save,
)

log = logging.getLogger(__name__)

REQUIRED = ("prompt", "chosen", "rejected")
# The TRL releases StepDPOTrainer was tested with (it overrides a private DPOTrainer method); pyproject pins them.
TESTED_TRL = "trl>=1.16,<1.17"


@dataclass
class StepDPOConfig(TrainSettings):
    """``psr train``: one round of step-wise DPO. Paper: full fine-tuning, 1 epoch, lr 5e-7, batch 32;
    Step-DPO used beta 0.4-0.5."""

    trainer_config: ClassVar[str] = "trl:DPOConfig"

    pairs: str = "pairs.jsonl"  # the round's pairs file
    ref_model: str | None = None  # the reference policy; default: the starting model (``model``)
    beta: float = 0.4  # DPO's strength of the pull towards the reference (Step-DPO: 0.4-0.5)
    learning_rate: float = 1e-6
    epochs: float = 1.0
    max_length: int | None = 1024  # prompt + step tokens
    max_prompt_length: int | None = None  # drop (and count) pairs whose prompt is longer
    precompute_ref_log_probs: bool = False  # run the reference once over the pairs, then drop it
    prompt_from: Literal["file", "render"] = "file"  # render: question + previous_steps with this tokenizer
    loss_type: str = "sigmoid"  # TRL's DPO loss (sigmoid = standard DPO)
    # > 0 adds TRL's "sft" loss (NLL of the chosen step) with this weight, as RPO does: DPO alone may
    # push the chosen step's likelihood down along with the rejected one (seen here at lr 2e-5).
    sft_weight: float = 0.0

    def trainer_arguments(self):
        return dpo_args(self)

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


# ---- pairs -----------------------------------------------------------------------------------
def load_pairs(path: str | Path, need: tuple[str, ...] = REQUIRED) -> list[dict]:
    """Read and check a pairs file; a problem raises :class:`DataError` naming file, line and field."""
    from psr.tasks.jsonl import is_hub_id, read_rows

    hub = not Path(path).exists() and is_hub_id(str(path))  # a dataset psr's hub block pushed: id:pairs:psr_round_1
    path = str(path) if hub else Path(path)
    if not hub and not path.exists():
        raise DataError(f"pairs file {path} does not exist (or give a hub dataset as id:split or id:config:split)")
    if not hub and path.is_dir():
        raise DataError(f"pairs file {path} is a directory (expected a JSONL file)")
    rows = []
    for lineno, row in read_rows(path) if hub else iter_jsonl(path):
        for fld in need:
            if fld not in row:
                raise DataError(f"{path}:{lineno}: missing field '{fld}' (a pair needs {', '.join(need)})")
            if fld == "previous_steps":
                if not isinstance(row[fld], list) or not all(isinstance(s, str) for s in row[fld]):
                    raise DataError(f"{path}:{lineno}: field 'previous_steps' must be a list of strings")
            elif not isinstance(row[fld], str):
                raise DataError(f"{path}:{lineno}: field '{fld}' must be a string, got {type(row[fld]).__name__}")
            elif fld in ("prompt", "chosen", "rejected", "question") and not row[fld].strip():
                raise DataError(f"{path}:{lineno}: field '{fld}' is empty")
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return rows


def skip_identical(rows: list[dict], path: str | Path) -> tuple[list[dict], int]:
    """Rows whose chosen and rejected steps differ (after stripping), and how many were skipped: an
    identical pair has no learning signal (its DPO loss is log 2 whatever the model). Some are
    skipped with a warning naming the lines; all of them is a :class:`DataError`."""
    keep = [r for r in rows if r["chosen"].strip() != r["rejected"].strip()]
    same = [r["_line"] for r in rows if r["chosen"].strip() == r["rejected"].strip()]
    if not keep:
        raise DataError(f"{path}: all {len(rows)} pairs have chosen == rejected: nothing to learn from")
    if same:
        lines = ", ".join(map(str, same[:10])) + (", ..." if len(same) > 10 else "")
        log.warning("%s: skipped %d of %d pairs whose chosen == rejected (line %s)", path, len(same), len(rows), lines)
    return keep, len(same)


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, eos: bool = False) -> dict:
    """Token ids of the prompt and of each step as they follow the prompt; no special tokens added,
    no EOS unless ``eos`` (whole-solution rows). When the prompt's last tokens merge with a step's
    first (a prompt not ending on a token boundary), the completion starts where they diverge, as in TRL."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = {k: tokenizer(prompt + text, add_special_tokens=False)["input_ids"]
            for k, text in (("chosen", chosen), ("rejected", rejected))}
    n = len(prompt_ids)
    for ids in full.values():
        n = min(n, next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids))))
    out = {"prompt_ids": prompt_ids[:n], "merged": n < len(prompt_ids)}
    for k, ids in full.items():
        out[f"{k}_ids"] = ids[n:] + ([tokenizer.eos_token_id] if eos else [])
    return out


class StepDPOTrainer(DPOTrainer):
    """DPOTrainer for rendered-text rows: tokenises them itself so that no EOS follows a step.
    Everything else (collator, loss, reference, metrics, distributed setup) is TRL's."""

    def __init__(self, *args, max_prompt_length: int | None = None, **kwargs):
        self.psr_max_prompt_length = max_prompt_length  # read by _prepare_dataset, which __init__ calls
        self.psr_dropped = 0
        self.psr_truncated = 0
        self.psr_ends_in_eos = {}  # dataset name -> per kept row: does it end in EOS on purpose (whole solutions)
        super().__init__(*args, **kwargs)
        self._check_no_eos_after_steps()

    def _check_no_eos_after_steps(self):
        """The tokenised training rows as TRL will train on them: a step must not end in EOS. This
        trainer relies on a private TRL method (``_prepare_dataset``); a TRL release that renamed it
        would silently bring EOS back after every step, so a clear error instead."""
        if "train" not in self.psr_ends_in_eos:
            raise RuntimeError(
                f"TRL {trl_version} did not tokenise the pairs through StepDPOTrainer._prepare_dataset (psr "
                f"overrides that private DPOTrainer method to keep EOS off the end of a step); install the TRL "
                f"psr was tested with: pip install '{TESTED_TRL}'")
        eos = getattr(self._tokenizer, "eos_token_id", None)
        if eos is None:
            return
        flags = self.psr_ends_in_eos["train"]
        data = self.train_dataset
        chosen, rejected = data["chosen_ids"], data["rejected_ids"]
        if len(flags) != len(chosen):
            raise RuntimeError(f"TRL {trl_version} changed the training rows after tokenisation ({len(flags)} "
                               f"tokenised, {len(chosen)} kept); install {TESTED_TRL!r}")
        bad = [i for i, (c, r, with_eos) in enumerate(zip(chosen, rejected, flags))
               if not with_eos and (list(c[-1:]) == [eos] or list(r[-1:]) == [eos])]
        if bad:
            raise DataError(
                f"{len(bad)} of {len(flags)} step pairs end in EOS after tokenisation (the first: training row "
                f"{bad[0]}); a step must not end the answer. A step's text that holds the EOS token "
                f"{self._tokenizer.eos_token!r} ends in it; if none does, TRL {trl_version} tokenises differently "
                f"from the TRL psr was tested with ({TESTED_TRL})")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        tok = self._tokenizer
        rows, merged, too_long, cut, longest, ends_in_eos = [], 0, 0, 0, 0, []
        for row in dataset:
            t = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], eos=row.get("kind") == "solution")
            merged += t.pop("merged")
            if (self.psr_max_prompt_length is not None and len(t["prompt_ids"]) > self.psr_max_prompt_length) or (
                    args.max_length is not None and len(t["prompt_ids"]) >= args.max_length):
                too_long += 1  # the step would be truncated away: no learning signal
                continue
            length = len(t["prompt_ids"]) + max(len(t["chosen_ids"]), len(t["rejected_ids"]))
            if args.max_length is not None and length > args.max_length:
                cut += 1  # TRL keeps the first max_length tokens: the step's end is cut off
                longest = max(longest, length)
            rows.append(t)
            ends_in_eos.append(row.get("kind") == "solution")
        if merged:
            log.warning("%d of %d %s pairs: the prompt's last token merges with the step's first; end the prompt "
                        "on a token boundary (a newline before 'Step n:')", merged, len(dataset), dataset_name)
        if too_long:
            log.warning("dropped %d of %d %s pairs whose prompt is too long", too_long, len(dataset), dataset_name)
        if cut:
            log.warning("%d of %d %s pairs are longer than max_length %d tokens (longest %d): their steps are cut "
                        "at max_length; raise max_length or drop long steps (pairs.max_step_tokens)", cut,
                        len(dataset), dataset_name, args.max_length, longest)
        if not rows:
            raise DataError(f"no {dataset_name} pairs left after dropping prompts longer than the max length")
        self.psr_dropped += too_long
        self.psr_truncated += cut
        self.psr_ends_in_eos[dataset_name] = ends_in_eos
        if args.precompute_ref_log_probs:
            return on_shared_file(rows, Path(args.output_dir) / SHARED_DATA_DIR / dataset_name)
        return Dataset.from_list(rows)


def on_shared_file(rows: list[dict], folder: Path) -> Dataset:
    """``rows`` as a dataset backed by a file in ``folder`` that every rank reads (written once, by rank 0).

    With ``precompute_ref_log_probs`` TRL caches the reference log-probs in a file named by
    ``dataset._get_cache_file_path``: beside the dataset's own file, or, for a dataset built in memory,
    under a random name in a temporary folder of each process, so under several processes every rank
    but 0 looks for a file that rank 0 never wrote (FileNotFoundError). A dataset on a file in the run
    folder (which every node sees) gives one shared cache path; an earlier attempt's cache of the same
    rows and model is reused."""
    from datasets import load_from_disk

    from psr.distributed import context

    rank, _, barrier = context()
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / digest
    if rank == 0 and not (path / "state.json").exists():
        tmp = folder / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(tmp))
        os.replace(tmp, path)
    barrier()
    return load_from_disk(str(path))


def oracle_pairs(tokenizer, n: int, seed: int = 0, split: str = "train", task=None) -> list[dict]:
    """``n`` pairs.jsonl rows made from the built-in task's truth (chosen = the reference step,
    rejected = a corruption of it, at a random step): for tests, benchmarks and an oracle baseline."""
    import random

    from psr.steps import render_prompt
    from psr.tasks.arithmetic import ArithmeticTask

    task = task or ArithmeticTask()
    rng = random.Random(f"oracle-{split}-{seed}")
    return [{"prompt": render_prompt(tokenizer, s.problem.question, s.previous_steps), "chosen": s.chosen,
             "rejected": s.rejected, "problem_id": s.problem.id, "step_index": s.step_index,
             "question": s.problem.question, "previous_steps": s.previous_steps, "chosen_score": 1, "rejected_score": 0,
             "margin": 1, "round": 0, "chosen_correct": True, "rejected_correct": False}
            for s in task.step_pairs(split, n, seed, rng)]


# ---- training --------------------------------------------------------------------------------
def dpo_args(cfg: StepDPOConfig) -> DPOConfig:
    losses = {"loss_type": [cfg.loss_type]}
    if cfg.sft_weight > 0:
        losses = {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_weight]}
    return build_trainer_arguments(cfg, DPOConfig, beta=cfg.beta, max_length=cfg.max_length,
                                   precompute_ref_log_probs=cfg.precompute_ref_log_probs, **losses)


def build_trainer(cfg: StepDPOConfig, callbacks: list | None = None, trainer_class: type = StepDPOTrainer):
    """The configured trainer, ready for ``.train()`` (tests and benchmarks use it directly;
    ``trainer_class=DPOTrainer`` gives plain TRL on the same rows, EOS appended)."""
    need = REQUIRED + (("question", "previous_steps") if cfg.prompt_from == "render" else ())
    rows, identical = skip_identical(load_pairs(cfg.pairs, need), cfg.pairs)
    args = dpo_args(cfg)  # before the models: DeepSpeed ZeRO-3 must see the config first
    model, tok = load_for_training(cfg.model, cfg)
    if cfg.prompt_from == "render":
        from psr.steps import render_prompt

        for r in rows:
            r["prompt"] = render_prompt(tok, r["question"], r["previous_steps"])
    ref = None
    if cfg.ref_model is not None and cfg.ref_model != cfg.model:
        ref, _ = load_for_training(cfg.ref_model, cfg)
        ref.eval()
    elif not cfg.lora and not cfg.precompute_ref_log_probs:
        ref, _ = load_for_training(cfg.model, cfg)  # a frozen copy of the starting model
        ref.eval()
    # With LoRA the reference is the starting model with the adapter disabled (no copy); with
    # precompute_ref_log_probs the starting model scores the pairs once before training.
    data = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "kind": r.get("kind", "step")}
            for r in rows]
    resume = resume_point(cfg, data)  # before the trainer: it may clear the partial directory
    data = Dataset.from_list(data)
    timer, callbacks = stage_callbacks(cfg, callbacks)
    extra = {"max_prompt_length": cfg.max_prompt_length} if issubclass(trainer_class, StepDPOTrainer) else {}
    trainer = trainer_class(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                            peft_config=lora_config(cfg), callbacks=callbacks, **extra)
    trainer.psr_timer, trainer.psr_resume = timer, resume
    trainer.psr_n_pairs = len(rows) + identical  # in the file
    trainer.psr_identical = identical
    return trainer


def run_train(cfg: StepDPOConfig, callbacks: list | None = None) -> dict:
    """Train one round and save the model to ``cfg.out`` (atomically); returns the training log."""
    prepare_output(cfg)
    trainer = build_trainer(cfg, callbacks)
    return train_and_save(cfg, trainer, pair_counts(trainer))


def pair_counts(trainer) -> dict:
    """What the trainer trained on and what it left out of the pairs file, for the log and the summary."""
    skipped = {"chosen == rejected": trainer.psr_identical, "prompt too long": trainer.psr_dropped}
    skipped = {k: v for k, v in skipped.items() if v}
    return {"pairs": trainer.psr_n_pairs - sum(skipped.values()), "pairs_in_file": trainer.psr_n_pairs,
            "pairs_skipped": skipped, "pairs_truncated": trainer.psr_truncated}


def step_logps(model, tokenizer, rows: list[dict], batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Summed log-probs of each row's chosen and rejected step given its prompt (step tokens only,
    no EOS), as the DPO loss sees them: for checking that training widens the margin."""
    import torch

    out = {"chosen": [], "rejected": []}
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = [tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"])
                     for r in rows[s : s + batch_size]]
            for key in out:
                seqs = [b["prompt_ids"] + b[f"{key}_ids"] for b in batch]
                width = max(map(len, seqs))
                ids = torch.tensor([q + [tokenizer.pad_token_id] * (width - len(q)) for q in seqs], device=model.device)
                mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=model.device)
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
                for i, b in enumerate(batch):
                    start, end = len(b["prompt_ids"]) - 1, len(seqs[i]) - 1
                    out[key].append(tok_logp[i, start:end].sum().item())
    return out["chosen"], out["rejected"]
