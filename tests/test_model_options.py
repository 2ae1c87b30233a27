"""revision, trust_remote_code and attn_implementation reach every model a stage loads, HF and vLLM alike."""

import pytest

from psr.cli import config_class
from psr.config import ConfigError, from_dict, load_config
from psr.models import ModelLoadError, ModelOptions, hf_kwargs, load_model, vllm_kwargs
from psr.rounds import RunConfig, init_stage


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_hf_model(attn):
    model, _ = load_model("tiny-random", options=ModelOptions(attn_implementation=attn))
    assert model.config._attn_implementation == attn


def test_a_bad_option_is_one_line_naming_the_model():
    with pytest.raises(ModelLoadError, match=r"could not load model 'tiny-random' .*: ValueError: .*nope"):
        load_model("tiny-random", options=ModelOptions(attn_implementation="nope"))


def test_options_as_hf_and_vllm_take_them():
    opts = ModelOptions(revision="v1", trust_remote_code=True, attn_implementation="flash_attention_2")
    assert hf_kwargs(opts) == {"revision": "v1", "trust_remote_code": True, "attn_implementation": "flash_attention_2"}
    assert hf_kwargs(opts, tokenizer=True) == {"revision": "v1", "trust_remote_code": True}
    assert hf_kwargs(ModelOptions()) == {}  # nothing set: transformers' own defaults
    assert vllm_kwargs(opts) == {"revision": "v1", "tokenizer_revision": "v1", "trust_remote_code": True,
                                 "attention_backend": "FLASH_ATTN"}
    assert vllm_kwargs(ModelOptions(attn_implementation="eager")) == {"trust_remote_code": False}


@pytest.mark.parametrize("command", ["eval", "search", "judge-eval", "build-eft", "init", "train", "iterate"])
def test_every_command_that_loads_a_model_has_the_options(command):
    cfg = from_dict(config_class(command), {"revision": "abc", "trust_remote_code": True,
                                            "attn_implementation": "sdpa"})
    assert (cfg.revision, cfg.trust_remote_code, cfg.attn_implementation) == ("abc", True, "sdpa")


def test_the_loop_sets_the_runs_options_on_its_stages(tmp_path, monkeypatch):
    import psr.train.sft

    seen = {}
    monkeypatch.setattr(psr.train.sft, "run_init", lambda cfg: seen.setdefault("cfg", cfg) and {})
    init_stage(from_dict(RunConfig, {"attn_implementation": "eager", "revision": "r2"}), tmp_path)()
    assert (seen["cfg"].attn_implementation, seen["cfg"].revision) == ("eager", "r2")
    with pytest.raises(ConfigError, match="train.attn_implementation is set by the loop from attn_implementation"):
        load_config(RunConfig, None, {"train.attn_implementation": "eager"})
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].revision is set by the loop"):
        from_dict(RunConfig, {"benchmarks": [{"name": "a", "revision": "x"}]})
