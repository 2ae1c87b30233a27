"""EDT (entropy-based dynamic temperature): exact numbers on hand-computed rows, the edges
(masked tokens, H -> 0, bf16), and generate() on tiny-random."""

import math

import pytest
import torch

from psr.cli import main
from psr.generation import generate
from psr.sampling import EDTLogitsProcessor, SamplingConfig
from psr.sampling.edt import MIN_TEMPERATURE
from psr.steps import render_prompt

INF = float("inf")
IDS = torch.zeros(1, 1, dtype=torch.long)  # EDT ignores input_ids


def edt_call(proc, rows, dtype=torch.float32):
    scores = torch.tensor(rows, dtype=dtype)
    return proc(IDS.expand(scores.shape[0], 1), scores)


def test_two_equal_logits_hand_computed():
    # p = (1/2, 1/2): H = ln 2 = 0.693147...; T = t0 * n ** (theta / H)
    # = 0.8 * 0.8 ** (0.5 / 0.693147) = 0.8 * exp(-0.223144 * 0.721348) = 0.8 * 0.851323 = 0.681058
    proc = EDTLogitsProcessor(t0=0.8, n=0.8, theta=0.5)
    expected_t = 0.8 * 0.8 ** (0.5 / math.log(2))
    assert expected_t == pytest.approx(0.681058, abs=1e-6)
    assert proc.temperatures(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(expected_t, rel=1e-6)
    out = edt_call(proc, [[0.0, 0.0], [1.0, 1.0]])
    assert out[0].tolist() == [0.0, 0.0]
    assert out[1].tolist() == pytest.approx([1 / expected_t] * 2, rel=1e-6)  # 1 / 0.681058 = 1.468303


def test_flat_row_of_four_hand_computed():
    # p uniform over 4: H = ln 4 = 1.386294; T = 1.0 * 0.5 ** (1.0 / 1.386294) = 2 ** -0.721348 = 0.606531
    proc = EDTLogitsProcessor(t0=1.0, n=0.5, theta=1.0)
    expected_t = 2 ** (-1 / math.log(4))
    assert expected_t == pytest.approx(0.606531, abs=1e-6)
    out = edt_call(proc, [[3.0, 3.0, 3.0, 3.0]])
    assert out[0].tolist() == pytest.approx([3 / expected_t] * 4, rel=1e-6)  # 4.946163


def test_peaked_row_hand_computed():
    # p = (0.9, 0.1): H = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.094824 + 0.230259 = 0.325083
    # T = 1.0 * 0.8 ** (0.5 / 0.325083) = exp(-0.223144 * 1.538069) = 0.709489
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert h == pytest.approx(0.325083, abs=1e-6)
    expected_t = 0.8 ** (0.5 / h)
    assert expected_t == pytest.approx(0.709489, abs=1e-6)
    proc = EDTLogitsProcessor(t0=1.0, n=0.8, theta=0.5)
    row = [math.log(0.9), math.log(0.1)]
    assert proc.temperatures(torch.tensor([row])).item() == pytest.approx(expected_t, rel=1e-5)
    out = edt_call(proc, [row])[0]
    assert out.tolist() == pytest.approx([math.log(0.9) / expected_t, math.log(0.1) / expected_t], rel=1e-5)
    # The sharpened distribution: p_i ** (1/T) normalised; 0.9 ** 1.409465 = 0.862 vs 0.1 ** 1.409465 = 0.039
    a, b = 0.9 ** (1 / expected_t), 0.1 ** (1 / expected_t)
    assert torch.softmax(out, -1).tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-5)
    assert a / (a + b) == pytest.approx(0.956765, abs=1e-6)


def test_masked_tokens_add_nothing_and_stay_masked():
    # [0, 0, -inf, -inf]: H = ln 2 exactly as for [0, 0]; the masked tokens stay -inf, no NaN.
    proc = EDTLogitsProcessor(t0=0.8, n=0.8, theta=0.5)
    expected_t = 0.8 * 0.8 ** (0.5 / math.log(2))
    out = edt_call(proc, [[2.0, 2.0, -INF, -INF]])[0]
    assert out[:2].tolist() == pytest.approx([2 / expected_t] * 2, rel=1e-6)
    assert out[2:].tolist() == [-INF, -INF]
    assert not out.isnan().any()


def test_rows_are_independent():
    proc = EDTLogitsProcessor(t0=0.9, n=0.8, theta=0.7)
    rows = [[math.log(0.9), math.log(0.1), -INF], [0.0, 0.0, 0.0], [5.0, -INF, -INF], [1.0, 2.0, 3.0]]
    together = edt_call(proc, rows)
    for i, row in enumerate(rows):
        alone = edt_call(proc, [row])[0]
        assert torch.allclose(together[i], alone, rtol=1e-6, atol=0)


def test_temperature_is_monotone_in_entropy_and_tends_to_t0():
    proc = EDTLogitsProcessor(t0=0.7, n=0.8, theta=1.0)
    # Two tokens, p = (q, 1 - q) with q going to 1/2: the entropy rises monotonically to ln 2.
    qs = [0.999, 0.99, 0.9, 0.8, 0.7, 0.6, 0.5]
    rows = torch.tensor([[math.log(q), math.log(1 - q)] for q in qs])
    temps = proc.temperatures(rows)
    assert torch.all(temps[1:] > temps[:-1])
    # Uniform rows over V tokens: H = ln V grows, T -> t0 from below (T = 0.7 * 0.8 ** (1 / ln V)).
    temps = [proc.temperatures(torch.zeros(1, v)).item() for v in (2, 10, 1000, 100_000)]
    assert all(a < b < 0.7 for a, b in zip(temps, temps[1:]))
    assert temps[-1] == pytest.approx(0.7 * 0.8 ** (1 / math.log(100_000)), rel=1e-5)  # 0.686563
    assert 0.7 - temps[-1] < 0.015


def test_zero_entropy_rows_are_greedy():
    proc = EDTLogitsProcessor(t0=1.0, n=0.8, theta=0.5)
    # One finite token: H = 0, T = 0 exactly. p of the runner-up is e^-40 (H ~ 1e-16) or e^-20
    # (H ~ 8.7e-8): T = 0.8 ** (0.5 / 8.7e-8) underflows to 0 as well.
    rows = [[1.5, -INF, -INF], [0.0, 40.0, 0.0], [20.0, 0.0, 0.0]]
    assert proc.temperatures(torch.tensor(rows)).tolist() == [0.0, 0.0, 0.0]
    out = edt_call(proc, rows)
    assert out.tolist() == [[1.5, -INF, -INF], [-INF, 40.0, -INF], [20.0, -INF, -INF]]
    # Sampling from a greedy row always yields its argmax.
    probs = torch.softmax(out, -1)
    assert probs.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_low_but_nonzero_entropy_is_sharpened_not_greedy():
    # p = (0.99, 0.01): H = 0.056002; T = 0.8 ** (0.5 / 0.056002) = 0.8 ** 8.928 = 0.136: not greedy.
    proc = EDTLogitsProcessor(t0=1.0, n=0.8, theta=0.5)
    h = -(0.99 * math.log(0.99) + 0.01 * math.log(0.01))
    t = proc.temperatures(torch.tensor([[math.log(0.99), math.log(0.01)]])).item()
    assert t == pytest.approx(0.8 ** (0.5 / h), rel=1e-5) and t > MIN_TEMPERATURE
    assert t == pytest.approx(0.136, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_nan_or_inf_leaves(dtype):
    torch.manual_seed(0)
    proc = EDTLogitsProcessor(t0=1.0, n=0.8, theta=5.0)
    scores = torch.randn(6, 1000) * torch.tensor([[0.01], [1.0], [30.0], [300.0], [3000.0], [1.0]])
    scores[1, :500] = -INF  # half masked
    scores[5, :] = -INF  # every token masked: stays all -inf, no NaN
    scores[3, 7] = 3e38  # near the float32 / bfloat16 maximum
    scores = scores.to(dtype)
    out = proc(IDS.expand(6, 1), scores)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    assert not out.isnan().any() and not (out == INF).any()
    finite_in = torch.isfinite(scores)
    assert (out[~finite_in] == -INF).all()  # masked tokens stay masked
    assert torch.isfinite(out[:5].max(dim=-1).values).all()  # every row keeps a finite best token
    assert torch.isfinite(proc.temperatures(scores)).all()
    # Whatever survives, a softmax of each non-empty row is a proper distribution.
    probs = torch.softmax(out[:5], -1)
    assert not probs.isnan().any() and torch.allclose(probs.sum(-1), torch.ones(5))


def test_arguments_are_checked():
    for bad in [dict(t0=0.0), dict(t0=1.0, n=1.0), dict(t0=1.0, n=0.0), dict(t0=1.0, theta=0.0)]:
        with pytest.raises(ValueError, match="EDT needs"):
            EDTLogitsProcessor(**bad)
    with pytest.raises(ValueError, match="edt needs"):
        SamplingConfig(policy="edt", n=1.5)


def test_sampling_config_for_edt():
    kwargs = SamplingConfig(policy="edt", t0=0.9, n=0.7, theta=0.3, top_p=0.9).generate_kwargs()
    assert kwargs["temperature"] == 1.0 and kwargs["top_p"] == 0.9 and kwargs["do_sample"]
    (proc,) = kwargs["logits_processor"]
    assert isinstance(proc, EDTLogitsProcessor) and (proc.t0, proc.n, proc.theta) == (0.9, 0.7, 0.3)


def test_generate_with_edt_is_seeded_and_scales_once(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in ["What is 2 + 3?", "Mia has 5 apples. She eats 2. How many are left?"]]
    edt = SamplingConfig(policy="edt", t0=0.8, theta=0.5)
    def run(cfg, seed):
        return generate(model, tok, prompts, cfg, max_new_tokens=16, num_samples=3, seed=seed, batch_size=6,
                        progress=False)

    a, b = run(edt, 7), run(edt, 7)
    assert a == b and all(len(x) == 3 for x in a)
    assert run(edt, 8) != a
    # theta -> 0: T = t0 for every row, so EDT draws exactly what fixed T = t0 draws with the same seed
    # (were the logits scaled twice, the draws would differ).
    near_fixed = SamplingConfig(policy="edt", t0=0.8, theta=1e-9, top_p=1.0)
    assert run(near_fixed, 5) == run(SamplingConfig(policy="fixed", temperature=0.8, top_p=1.0), 5)
    # theta huge: T -> 0 for every row, so every sample is the greedy completion.
    near_greedy = SamplingConfig(policy="edt", t0=0.8, theta=1e6)
    greedy = generate(model, tok, prompts, max_new_tokens=16, progress=False)
    assert run(near_greedy, 5) == [[g[0]] * 3 for g in greedy]


def test_psr_eval_maj_at_k_with_edt(tmp_path, monkeypatch):
    import psr.evaluate

    seen = {}
    monkeypatch.setattr(psr.evaluate, "evaluate", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.setattr(psr.evaluate, "format_table", lambda result: "")
    assert main(["eval", "--model", "tiny-random", "--samples", "4", "--sampling.policy", "edt", "--sampling.t0", "0.9",
                 "--sampling.theta", "0.2"]) == 0
    s = seen.pop("cfg").sampling
    assert (s.policy, s.t0, s.theta, s.n) == ("edt", 0.9, 0.2, 0.8)
    assert main(["eval", "--model", "tiny-random", "--samples", "4", "--policy", "fixed",
                 "--sampling.temperature", "0.3"]) == 0
    s = seen.pop("cfg").sampling
    assert (s.policy, s.temperature) == ("fixed", 0.3)
    # A partial sampling block keeps the rest of EvalConfig's own default (fixed, T = 0.7), not SamplingConfig's greedy.
    assert main(["eval", "--model", "tiny-random", "--samples", "4", "--sampling.top-p", "0.8"]) == 0
    s = seen.pop("cfg").sampling
    assert (s.policy, s.temperature, s.top_p) == ("fixed", 0.7, 0.8)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("sampling:\n  policy: edt\n  theta: 1.0\n")
    assert main(["eval", "--config", str(cfg), "--sampling.top_p", "0.9"]) == 0
    s = seen.pop("cfg").sampling
    assert (s.policy, s.theta, s.top_p) == ("edt", 1.0, 0.9)
    assert main(["eval", "--model", "tiny-random"]) == 0
    assert seen.pop("cfg").sampling == SamplingConfig(policy="fixed", temperature=0.7)  # EvalConfig's default
