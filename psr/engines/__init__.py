"""Which engine generates and judges: HF ``generate`` (always there) or vLLM (opt-in, ``make setup-vllm``).

Every stage that generates or judges takes a ``generation:`` block (:class:`GenerationConfig`) and
loads its model through :func:`load_generator`. With ``backend: hf`` that is the HF model itself;
with ``backend: vllm`` it is a :class:`psr.engines.vllm_engine.VLLMEngine`, which the same call
sites accept: ``psr.generation.generate`` hands it the prompts, the step judge and the rubric judge
ask it for the probabilities of their verdict tokens (:meth:`VLLMEngine.choice_probs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psr.config import check_at_least
from psr.distributed import context


@dataclass
class GenerationConfig:
    """The engine behind generation and judging (README: vLLM backend)."""

    # hf: transformers generate; vllm: the vLLM engine (`make setup-vllm` on a CPU, `pip install psr[vllm]` on GPUs)
    backend: Literal["hf", "vllm"] = "hf"
    # vllm: GPUs one engine spans (vLLM's own tensor parallelism), in a single process. Under accelerate/torchrun
    # every rank runs an engine of its own on its own GPU instead (data parallel; this must then be 1).
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # vllm on CUDA: share of GPU memory the engine may take
    kv_cache_gb: float = 2.0  # vllm on a CPU: memory set aside for the KV cache (GiB)
    # vllm: skip torch.compile and CUDA graphs; measured here it starts in seconds instead of ~80 s, which a
    # demo-sized stage does not win back (set false for long GPU runs)
    enforce_eager: bool = True
    # longest prompt + completion in tokens (null: the model's own); prompts are measured against it on either
    # backend, and one that does not fit is handled by its stage's rule (psr/lengths.py), never sent
    max_model_len: int | None = 4096
    max_num_seqs: int = 256  # vllm: most sequences decoded together
    # vllm: tokens per KV-cache block. Prefix caching reuses whole blocks, so smaller blocks share more of a
    # step's judge prompts: 32 (the CPU kernels' smallest) judged 2.2x faster than vLLM's CPU default of 128
    block_size: int | None = 32

    def __post_init__(self):
        check_at_least(self, 1, "tensor_parallel_size", "max_model_len", "max_num_seqs")
        if not 0 < self.gpu_memory_utilization <= 1 or self.kv_cache_gb <= 0:
            raise ValueError("gpu_memory_utilization must be in (0, 1] and kv_cache_gb > 0")


def is_engine(model) -> bool:
    """True for a vLLM engine standing where an HF model would."""
    return getattr(model, "is_vllm_engine", False)


def load_generator(name: str, dtype=None, device: str | None = None, gen: GenerationConfig | None = None,
                   options=None):
    """``(model or engine, tokenizer)`` for ``name`` on the backend ``gen`` asks for; ``options``: a config with
    the :class:`psr.models.ModelOptions` fields (revision, trust_remote_code, attn_implementation)."""
    from psr.models import load_model, load_tokenizer, model_options, resolve_model_path

    gen = gen or GenerationConfig()
    options = model_options(options)
    if gen.backend == "hf":
        model, tok = load_model(name, dtype=dtype, device=device, options=options)
        if model is not None:
            model.psr_max_len = gen.max_model_len  # the same context as vLLM's, for psr.lengths
        return model, tok
    import importlib.util

    from psr.config import ConfigError
    from psr.engines.vllm_engine import VLLMEngine

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("generation.backend vllm needs vLLM in this environment: `make setup-vllm` builds "
                          ".venv-vllm on a CPU (run .venv-vllm/bin/psr), `pip install -e '.[vllm]'` on GPUs")
    world = context()[1]
    if world > 1 and gen.tensor_parallel_size > 1:
        raise ConfigError(f"generation.tensor_parallel_size is {gen.tensor_parallel_size} under {world} processes: "
                          "launched by accelerate/torchrun, every rank runs a vLLM engine of its own on its own "
                          "GPU, so it must be 1; for one engine spread over several GPUs launch psr as one process")
    tok = load_tokenizer(name, options)
    return VLLMEngine(resolve_model_path(name), tok, dtype, gen, world=world, options=options), tok


def loads_together(gen: GenerationConfig) -> bool:
    """Must every rank load its engine, even one with nothing left to do? vLLM engines under a launcher set
    themselves up with collectives over the launcher's process group (their parallel groups, the KV-cache
    size), which wait for all ranks."""
    return gen.backend == "vllm" and context()[1] > 1


def release(model) -> None:
    """Free an engine's memory (its KV cache) once a stage is done with it; an HF model is left to GC."""
    if is_engine(model):
        model.close()
