"""Training stages, one trainer per module with its config dataclass beside it (as in TRL):

- :mod:`psr.train.sft`: ``psr init``, M0 -> M1, SFT on IFT (step-formatted solutions) + EFT
  (pairwise step-judge) data with TRL's SFTTrainer (``InitConfig``, ``build_ift``, ``build_eft``, ``run_init``);
- :mod:`psr.train.step_dpo`: ``psr train``, step-wise DPO on a round's ``pairs.jsonl`` with TRL's
  DPOTrainer, no EOS after a step (``StepDPOConfig``, ``load_pairs``, ``run_train``);
- :mod:`psr.train.common`: shared config fields, LoRA/device settings, logs, the atomic save.

Both run unchanged under ``accelerate launch --config_file accelerate_configs/<X>.yaml -m psr.cli ...``.
"""
