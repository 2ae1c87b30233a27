"""Model families the tiny Llama does not cover (issue 19 item 8), on tiny random models built from a
config: several end tokens in ``generation_config`` (Llama-3-Instruct), absolute positions (GPT-2) under
the judge's left padding, soft-capped final logits (Gemma-2) in the judge's verdict probabilities."""

import copy

import pytest
import torch

from psr.generation import generate
from psr.judge import JudgeConfig, StepJudge, token_probs
from psr.steps import render_prompt

QUESTION = "Mia has 19 apples. She gives away 5 apples and then buys 7 more. How many apples does she have now?"


def test_generation_stops_at_every_end_token_the_generation_config_names(tiny):
    model, tok = tiny
    model = copy.copy(model)  # the session's model keeps its own generation config
    model.generation_config = copy.deepcopy(model.generation_config)
    prompt = render_prompt(tok, "What is 2 + 3?")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    free = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    k = next((i for i, t in enumerate(free) if i and t not in free[:i]), 0)  # a token's first appearance
    assert free[k] != tok.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, free[k]]  # a second end token, as Llama-3 has
    out = generate(model, tok, [prompt], max_new_tokens=12, progress=False)[0][0]
    assert out == tok.decode(free[: k + 1], skip_special_tokens=True).strip()  # stopped at the second one
    assert len(free) > k + 1  # without it the model would have gone on


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=2048,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval()


def test_plain_judge_left_padding_keeps_absolute_positions(tiny):
    """Left padding shifts a short row to the right; with position ids counted from each row's first real
    token a model with learned absolute positions (GPT-2) scores it as it scores the row alone."""
    _, tok = tiny
    model = _gpt2(tok)
    judge = StepJudge(model, tok, JudgeConfig(prefix_reuse=False, batch_size=8))
    prompts = [judge.prompt(QUESTION, prev, "Step 2: 19 - 5 = 14.", "Step 2: 19 + 5 = 24.", True)
               for prev in ([], ["Step 1: Mia starts with 19 apples."],
                            ["Step 1: Mia starts with 19 apples and gives some of them away to a friend today."])]
    lengths = {len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) == 3  # the rows really are padded differently
    batched = judge._prob_a_plain(prompts)
    alone = [judge._prob_a_plain([p])[0] for p in prompts]
    assert batched == pytest.approx(alone, abs=1e-5)
    # what the position ids fix: the same batch without them scores the padded rows differently
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        hidden = model.get_decoder()(**batch).last_hidden_state[:, -1]
    unpositioned = judge._prob_a(hidden)
    assert max(abs(a - b) for a, b in zip(unpositioned, alone)) > 1e-3


def test_verdict_probabilities_are_soft_capped_as_the_model_caps_its_logits(tiny):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits large enough for the cap to matter
    ids = tok(render_prompt(tok, QUESTION), add_special_tokens=False, return_tensors="pt")["input_ids"]
    choices = [5, 17, 42, 99]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, -1]
        expected = torch.softmax(model(input_ids=ids).logits[:, -1, choices].float(), -1)  # the model caps itself
        uncapped = torch.softmax(hidden @ model.lm_head.weight[choices].T, -1)
    assert torch.allclose(token_probs(model, hidden, choices), expected, atol=1e-5)
    assert (uncapped - expected).abs().max() > 0.05  # the cap changes these probabilities
