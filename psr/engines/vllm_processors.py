"""psr's decoding rules inside vLLM, as vLLM (v1) batch-level logits processors, switched on per request
through ``SamplingParams.extra_args`` (``VLLMEngine`` sets them):

- ``VLLMEDTLogitsProcessor`` (``extra_args["psr_edt"] = [t0, n, theta]``, with ``temperature=1.0``): the
  same per-row temperature T = t0 * n ** (theta / H) as ``EDTLogitsProcessor``, which it calls. vLLM runs
  an argmax-invariant processor after its temperature step (1.0 here: a no-op) and before top-k/top-p,
  which is where HF runs ``EDTLogitsProcessor`` (before its top-p warper). Dividing a row by a positive T,
  or keeping only its argmax, leaves the argmax in place, so it is argmax-invariant and greedy rows skip it.
- ``VLLMStepStopProcessor`` (``extra_args["psr_stop"] = [at_step, eos_id]``): HF's ``StepBoundaryStopping``
  (``stop_reached`` on the decoded completion, in O(new tokens) per decode step through ``StepStopTracker``),
  ending a row by forcing its end token. vLLM's own stop
  strings cannot say it: they fire on a leading "\\nStep 2:" that HF strips and keeps, and no string
  says "the line of a complete \\boxed{} has ended".
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from psr.generation import StepStopTracker
from psr.sampling.edt import EDTLogitsProcessor

EDT_KEY = "psr_edt"
STOP_KEY = "psr_stop"


def _extra(params, key):
    return (params.extra_args or {}).get(key)


def _edt_of(params) -> tuple[float, float, float] | None:
    value = _extra(params, EDT_KEY)
    return None if value is None else tuple(float(v) for v in value)


class VLLMEDTLogitsProcessor(LogitsProcessor):
    """Per-request EDT over the rows of vLLM's persistent batch."""

    @classmethod
    def validate_params(cls, sampling_params):
        edt = _edt_of(sampling_params)
        if edt is not None:
            EDTLogitsProcessor(*edt)  # raises ValueError on bad t0/n/theta, as the HF processor does

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[float, float, float]] = {}  # batch index -> (t0, n, theta)
        self.processors: dict[tuple, EDTLogitsProcessor] = {}

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _prompt, _out: _edt_of(params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for index, edt in self.rows.items():
            groups.setdefault(edt, []).append(index)
        for edt, indices in groups.items():  # usually one group: every candidate of a search shares its policy
            proc = self.processors.get(edt) or self.processors.setdefault(edt, EDTLogitsProcessor(*edt))
            idx = torch.tensor(indices, device=logits.device)
            logits[idx] = proc(None, logits[idx]).to(logits.dtype)
        return logits


class VLLMStepStopProcessor(LogitsProcessor):
    """Ends a row (forces its end token) once its completion reaches the next step or its answer's line end."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer) if vllm_config else None
        # batch index -> (eos id, the request's live list of output token ids, its incremental stop check)
        self.rows: dict[int, tuple[int, list[int], StepStopTracker]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy rows pick

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def state(params, _prompt, output_ids):
            value = _extra(params, STOP_KEY)
            return None if value is None else (int(value[1]), output_ids, StepStopTracker(self.tok, bool(value[0])))

        process_dict_updates(self.rows, batch_update, state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (eos, output_ids, tracker) in self.rows.items():
            if tracker.update(output_ids):  # decodes only the ids added since the last step
                logits[index] = float("-inf")
                logits[index, eos] = 0.0
        return logits
