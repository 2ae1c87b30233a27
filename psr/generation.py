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


class StepStopScanner:
    """``stop_reached`` in O(new characters): fed a completion's text piece by piece, says whether the text so far
    has reached the next step's marker (``at_step``) or ended its boxed answer's line, with the same answer as
    ``stop_reached(text_so_far, at_step)`` at every point up to the first True (tests compare the two).

    - ``NEXT_STEP_RE`` (``\\s+Step\\s*\\d+\\s*:``, after ``lstrip``) is followed as a set of NFA states over characters;
    - ``answer_line_end``: every open ``\\boxed{`` keeps its brace depth; the earliest one that has closed gives the
      answer's end, and a newline after that end is the stop (an earlier, outer ``\\boxed{`` closing later moves
      the end, as ``final_answer_end``'s first-complete rule does).
    """

    _WS, _S, _ST, _STE, _STEP, _DIG, _DIGWS = range(7)

    def __init__(self, at_step: bool = True):
        self.at_step = at_step
        self.started = False  # past the leading whitespace (stop_reached lstrips)
        self.states: set[int] = set()
        self.tail = ""  # last 6 characters, to spot "\\boxed{" across pieces
        self.pos = 0  # characters fed since the first non-space one
        self.open: list[list[int]] = []  # [start, depth] of each unclosed \\boxed{
        self.answer_start: int | None = None  # start of the earliest closed \\boxed{
        self.done = False

    def feed(self, text: str) -> bool:
        if self.done:
            return True
        for ch in text:
            if not self.started:
                if ch.isspace():
                    continue
                self.started = True
            if self._char(ch):
                self.done = True
                return True
        return False

    def _char(self, ch: str) -> bool:
        space = ch.isspace()
        if self.at_step:
            nxt = set()
            for st in self.states:
                if st == self._WS:
                    if space:
                        nxt.add(self._WS)
                    elif ch == "S":
                        nxt.add(self._S)
                elif st in (self._S, self._ST, self._STE):
                    if ch == "tep"[st - self._S]:
                        nxt.add(st + 1)
                elif st == self._STEP:  # "Step" then \\s*
                    if space:
                        nxt.add(self._STEP)
                    elif ch.isdecimal():
                        nxt.add(self._DIG)
                elif st in (self._DIG, self._DIGWS):
                    if ch == ":":
                        return True
                    if space:
                        nxt.add(self._DIGWS)
                    elif ch.isdecimal() and st == self._DIG:
                        nxt.add(self._DIG)
            if space:
                nxt.add(self._WS)  # a match may start at any whitespace
            self.states = nxt
        # the boxed answer's line
        if ch == "\n" and self.answer_start is not None:
            return True
        self.tail = (self.tail + ch)[-7:]
        if ch == "{":
            for entry in self.open:
                entry[1] += 1
            if self.tail == "\\boxed{":
                self.open.append([self.pos - 6, 1])
        elif ch == "}":
            for entry in self.open:
                entry[1] -= 1
            closed = [e for e in self.open if e[1] == 0]
            if closed:
                self.open = [e for e in self.open if e[1] != 0]
                start = closed[0][0]
                if self.answer_start is None or start < self.answer_start:
                    self.answer_start = start  # its line starts counting from here: no newline after it yet
        self.pos += 1
        return False


class IncrementalDetokenizer:
    """The text of a growing list of token ids, one delta at a time, decoding only a short window (vLLM's
    prefix/read-offset scheme): the window keeps the token before the new ones, so that tokenizers which drop
    a leading space or merge bytes across tokens decode as they do in the whole text; a delta ending in an
    incomplete UTF-8 character (U+FFFD) waits for its next token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        decode = self.tok.decode
        prefix_text = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            # the next window starts a few tokens back (never before this delta): O(1) even after a long push
            self.prefix, self.read = max(self.read, len(self.ids) - 4), len(self.ids)
            return text[len(prefix_text) :]
        return ""


class StepStopTracker:
    """One completion's stop check in O(new tokens): ``update(output_ids)`` with the completion's ids so far
    (only those not seen yet are decoded) -> has it reached its step stop (see ``stop_reached``)?"""

    def __init__(self, tokenizer, at_step: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.scanner = StepStopScanner(at_step)
        self.seen = 0

    def update(self, output_ids) -> bool:
        """``output_ids``: the completion's ids so far (a list that grows); only the unseen ones are decoded."""
        new = output_ids[self.seen :]
        self.seen = len(output_ids)
        return self.push(new)

    def push(self, new_ids) -> bool:
        """Feed just the completion's next ids."""
        if self.scanner.done:
            return True
        return self.scanner.feed(self.detok.push(new_ids)) if len(new_ids) else False


class StepBoundaryStopping(StoppingCriteria):
    """Per-row stop once the new text reaches the next step's marker (``at_step``) or ends the line
    of its boxed answer; each call decodes only the rows' new tokens (``StepStopTracker``)."""

    def __init__(self, tokenizer, prompt_len: int, at_step: bool = True):
        self.tokenizer, self.prompt_len, self.at_step = tokenizer, prompt_len, at_step
        self.trackers: list[StepStopTracker] | None = None
        self.seen = 0  # completion columns already fed to the trackers

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.trackers is None:
            self.trackers = [StepStopTracker(self.tokenizer, self.at_step) for _ in range(input_ids.shape[0])]
        new = input_ids[:, self.prompt_len + self.seen :].tolist()
        self.seen = input_ids.shape[1] - self.prompt_len
        done = [tr.push(row) for tr, row in zip(self.trackers, new)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class FullDecodeStepStopping(StoppingCriteria):
    """The step stop as it was before issue 30: every call re-decodes every row's whole completion (O(length)
    per decode step). Kept as the reference that tests and ``benchmarks/step_stop.py`` compare against."""

    def __init__(self, tokenizer, prompt_len: int, at_step: bool = True):
        self.tokenizer, self.prompt_len, self.at_step = tokenizer, prompt_len, at_step

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [stop_reached(t, self.at_step) for t in new]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class PerRowSampler:
    """Samples every row of the batch from its own ``torch.Generator`` (last logits processor; ``generate`` then
    runs greedy, which takes the one token left). A row's draws depend on its seed and its own logits only,
    not on which rows share its batch or in what order (HF's own sampling draws the whole batch from torch's
    global generator)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1).cpu()
        picks = [int(torch.multinomial(probs[r], 1, generator=g)) for r, g in enumerate(self.generators)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks, device=scores.device)] = 0.0
        return out


def per_row_kwargs(sampling: SamplingConfig, row_seeds: list[int]) -> dict:
    """``model.generate`` kwargs that sample ``sampling``'s policy with one seed per row: its warpers as explicit
    logits processors (EDT or temperature, then top-p, as HF orders them), then ``PerRowSampler``."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from psr.sampling import EDTLogitsProcessor

    procs = ([EDTLogitsProcessor(sampling.t0, sampling.n, sampling.theta)] if sampling.policy == "edt"
             else [TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1:
        procs.append(TopPLogitsWarper(sampling.top_p))
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "logits_processor": [*procs, PerRowSampler(row_seeds)]}


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
    seeds: list[list[int]] | None = None,
) -> list[list[str]]:
    """Complete every (already chat-templated) prompt ``num_samples`` times.

    Returns one list of ``num_samples`` completions per prompt, in the order of ``prompts``.
    Prompts are batched by length so that little is padded; ``batch_size`` counts sequences,
    so a batch holds ``max(1, batch_size // num_samples)`` prompts. ``model`` may be a vLLM engine
    (``psr.engines``), which schedules its own batches.

    ``seeds`` (one list of ``num_samples`` ints per prompt): every completion samples from its own generator
    seeded so, whatever else shares its batch (``PerRowSampler``); the search derives them from (run seed,
    problem, step, attempt, candidate), so its candidates do not depend on batching or sharding.
    """
    if getattr(model, "is_vllm_engine", False):
        return model.generate(prompts, sampling, max_new_tokens, num_samples, stop_at_step, stop_at_answer,
                              seed, desc, progress, seeds=seeds)
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
        seeded = seeds is not None and sampling.policy != "greedy"
        # seeded rows sample as greedy over PerRowSampler's pick, and greedy generate returns one sequence per
        # row: each prompt is repeated num_samples times instead
        rows = [encoded[i] for i in idx for _ in range(num_samples if seeded else 1)]
        batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
        prompt_len = batch["input_ids"].shape[1]
        stopping = (StoppingCriteriaList([StepBoundaryStopping(tokenizer, prompt_len, at_step=stop_at_step)])
                    if stop_at_step or stop_at_answer else None)
        kwargs = per_row_kwargs(sampling, [k for i in idx for k in seeds[i]]) if seeded else gen_kwargs
        budget = max_new_tokens if limit is None else min(max_new_tokens, limit - prompt_len)
        out = model.generate(
            **batch, max_new_tokens=budget, num_return_sequences=1 if seeded else num_samples,
            stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(set(eos)),
            **kwargs,
        )
        texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        for j, text in enumerate(texts):
            text = cut_at_step_boundary(text) if stop_at_step else (cut_after_answer(text) if stop_at_answer else text)
            results[idx[j // num_samples]].append(text.strip())
        bar.update(len(idx))
    bar.close()
    return results
