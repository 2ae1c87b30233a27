"""Batched generation with the chat template: left padding, length-sorted batches, a progress
bar, seeds, and optional stopping at a step boundary (the next ``Step n:`` marker)."""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from psr.sampling import SamplingConfig
from psr.steps import answer_line_end

# A later step starts with "Step n:" after whitespace, usually a newline; the first step of a completion has
# nothing before it. Small models also run steps together on one line ("... previous step. Step 2: Add"):
# that is two steps, so a marker after a space ends the step too.
NEXT_STEP_RE = re.compile(r"\s+Step\s*\d+\s*:")


def cut_at_step_boundary(text: str) -> str:
    """One step of ``text``: everything before the next ``Step n:`` marker, or, when the step
    holds the final ``\\boxed{}``, up to the end of that line. Leading blank lines are dropped first: a
    model that opens with ``\\nStep 2:`` is writing step 2, not ending an empty one."""
    text = text.lstrip()
    m = NEXT_STEP_RE.search(text)
    if m:
        text = text[: m.start()]
    return cut_after_answer(text)


def cut_after_answer(text: str) -> str:
    """``text`` up to the end of the line holding its first complete ``\\boxed{}`` answer (all of it
    when there is none): what evaluation grades, with or without stopping at the answer."""
    end = answer_line_end(text)
    return (text if end is None else text[:end]).rstrip()


def stop_reached(new_text: str, at_step: bool) -> bool:
    """Has a completion said enough: the next step's marker (``at_step``), or the end of its boxed answer's line?
    Leading whitespace does not count (see ``cut_at_step_boundary``)."""
    text = new_text.lstrip()
    return (at_step and bool(NEXT_STEP_RE.search(text))) or answer_line_end(text) is not None


class StepBoundaryStopping(StoppingCriteria):
    """Per-row stop once the new text reaches the next step's marker (``at_step``) or ends the line
    of its boxed answer."""

    def __init__(self, tokenizer, prompt_len: int, at_step: bool = True):
        self.tokenizer, self.prompt_len, self.at_step = tokenizer, prompt_len, at_step

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [stop_reached(t, self.at_step) for t in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig | None = None,
    max_new_tokens: int = 384,
    batch_size: int = 16,
    num_samples: int = 1,
    stop_at_step: bool = False,
    stop_at_answer: bool = False,
    seed: int | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> list[list[str]]:
    """Complete every (already chat-templated) prompt ``num_samples`` times.

    Returns one list of ``num_samples`` completions per prompt, in the order of ``prompts``.
    Prompts are batched by length so that little is padded; ``batch_size`` counts sequences,
    so a batch holds ``max(1, batch_size // num_samples)`` prompts. ``model`` may be a vLLM engine
    (``psr.engines``), which schedules its own batches.
    """
    if getattr(model, "is_vllm_engine", False):
        return model.generate(prompts, sampling, max_new_tokens, num_samples, stop_at_step, stop_at_answer,
                              seed, desc, progress)
    sampling = sampling or SamplingConfig()
    if sampling.policy == "greedy" and num_samples > 1:
        raise ValueError("num_samples > 1 needs a sampling policy (fixed or edt), not greedy")
    if seed is not None:
        torch.manual_seed(seed)
    from psr.lengths import context_limit, warn_not_sent

    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # The last length guard (psr.lengths): a prompt that leaves no room for a new token is not sent (empty
    # completions); a batch's budget is cut to what its longest prompt leaves of the context.
    limit = context_limit(model)
    too_long = {i for i, ids in enumerate(encoded) if limit is not None and len(ids) >= limit}
    warn_not_sent(len(too_long), limit, desc)
    order = sorted((i for i in range(len(prompts)) if i not in too_long), key=lambda i: -len(encoded[i]))
    per_batch = max(1, batch_size // num_samples)
    results: list[list[str]] = [[""] * num_samples if i in too_long else [] for i in range(len(prompts))]
    gen_kwargs = sampling.generate_kwargs()
    # generation_config may name several end tokens (Llama-3-Instruct: <|end_of_text|> and <|eot_id|>): keep all.
    configured = model.generation_config.eos_token_id
    eos = [tokenizer.eos_token_id] + ([configured] if isinstance(configured, int) else list(configured or []))
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(model.device)
        prompt_len = batch["input_ids"].shape[1]
        stopping = (StoppingCriteriaList([StepBoundaryStopping(tokenizer, prompt_len, at_step=stop_at_step)])
                    if stop_at_step or stop_at_answer else None)
        budget = max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_len)
        out = model.generate(
            **batch, max_new_tokens=budget, num_return_sequences=num_samples,
            stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(set(eos)),
            **gen_kwargs,
        )
        texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        for j, text in enumerate(texts):
            text = cut_at_step_boundary(text) if stop_at_step else (cut_after_answer(text) if stop_at_answer else text)
            results[idx[j // num_samples]].append(text.strip())
        bar.update(len(idx))
    bar.close()
    return results
