"""The length guard (psr/lengths.py): a prompt longer than the engine's context is handled by its stage's
stated rule and counted, never sent. On HF the context is ``generation.max_model_len`` as on vLLM, so a small
``max_model_len`` on tiny-random makes every rule fire within a few tokens (tests/test_vllm.py does the same
on the vLLM engine). Before the guard, vLLM ended the rank on such a prompt and HF ran past the context."""

import pytest

from psr.engines import GenerationConfig, load_generator
from psr.evaluate import EvalConfig, evaluate
from psr.generation import generate
from psr.judge import JudgeConfig, StepJudge, elision_note
from psr.lengths import context_limit, token_count
from psr.sampling import SamplingConfig
from psr.search import SearchConfig, run_search
from psr.steps import render_prompt
from psr.tasks import TaskConfig, make_task


def tiny_with_context(n: int):
    return load_generator("tiny-random", gen=GenerationConfig(max_model_len=n))


@pytest.fixture(scope="module")
def problem():
    return make_task(TaskConfig(max_steps=6, min_steps=6)).problems("test", 1, seed=0)[0]


def test_context_is_max_model_len_on_hf_too():
    model, _ = tiny_with_context(300)
    assert context_limit(model) == 300
    model, _ = tiny_with_context(100_000)
    assert context_limit(model) == model.config.max_position_embeddings  # the model's own bound wins


def test_generate_sends_no_prompt_without_room_and_cuts_the_budget(problem):
    model, tok = tiny_with_context(10_000)
    short, long = render_prompt(tok, problem.question), render_prompt(tok, problem.question, problem.reference_steps)
    n_short, n_long = token_count(tok, short), token_count(tok, long)
    model.psr_max_len = n_long  # the long prompt fills the context; the short one leaves 40 tokens or more
    greedy = SamplingConfig(policy="greedy")
    out = generate(model, tok, [short, long], greedy, max_new_tokens=400, progress=False)
    assert out[1] == [""]  # not sent
    # the short one's completion was cut at the context, not at max_new_tokens
    assert token_count(tok, out[0][0]) <= n_long - n_short


def test_judge_leaves_out_earliest_steps_then_gives_up(problem):
    model, tok = tiny_with_context(10_000)
    judge = StepJudge(model, tok, JudgeConfig(prefix_reuse=False))
    steps, cands = problem.reference_steps[:5], ["Step 6: x = 1.", "Step 6: x = 2."]
    full = token_count(tok, judge.prompt(problem.question, steps, *cands, True))
    without_two = token_count(tok, judge.prompt(problem.question, [elision_note(2), *steps[2:]], *cands, True))
    model.psr_max_len = without_two + 1  # fits once two steps are left out, not with all five
    assert full + 1 > model.psr_max_len
    comp = judge.compare([(problem.question, steps, cands)])[0]
    assert comp.elided == 2 and not comp.too_long and len(comp.order_scores) == 2
    bare = token_count(tok, judge.prompt(problem.question, [elision_note(5)], *cands, True))
    model.psr_max_len = bare  # not even the question and the candidates leave a token for the verdict
    comp = judge.compare([(problem.question, steps, cands)])[0]
    assert comp.too_long and comp.scores == [0, 0] and comp.order_scores == {}


def test_search_stops_a_problem_whose_prompt_no_longer_fits(tmp_path):
    model, tok = tiny_with_context(200)  # the first step's prompt (~110 tokens) fits; a few steps later it does not
    cfg = SearchConfig(model="tiny-random", limit=4, width=2, max_steps=20, max_step_tokens=24, chunk_size=4,
                       judge=JudgeConfig(aggregation="sum", tie_margin=0.0), out=str(tmp_path),
                       task=TaskConfig(min_steps=6, max_steps=6))
    stats = run_search(cfg, model, tok, progress=False)
    assert stats["context"]["problems_too_long"] > 0
    assert stats["status"].get("too_long") == stats["context"]["problems_too_long"]


def test_eval_counts_a_problem_without_room_as_wrong_and_too_long(tmp_path):
    model, tok = tiny_with_context(150)  # prompts ~110 tokens + 64 new tokens do not fit
    r = evaluate(EvalConfig(model="tiny-random", limit=3, max_new_tokens=64, out=str(tmp_path / "e.json")),
                 model, tok, progress=False)
    assert r["too_long"] == 3 and r["accuracy"] == 0
    assert all(p["too_long"] and p["output"] == "" for p in r["problems"])
    model.psr_max_len = 4096
    r = evaluate(EvalConfig(model="tiny-random", limit=3, max_new_tokens=64), model, tok, progress=False)
    assert r["too_long"] == 0


def test_srlm_leaves_rubric_prompts_that_do_not_fit_unscored(tmp_path):
    from psr.srlm import RubricJudge

    model, tok = tiny_with_context(10_000)
    judge = RubricJudge(model, tok)
    q = "What is 1 + 1?"
    short, long = "Step 1: 2.", "Step 1: " + "1 + 1 " * 200
    model.psr_max_len = token_count(tok, judge._prompt(q, short, True)) + 5
    scores, _ = judge.score([(q, short), (q, long)])
    assert scores[0] is not None and scores[1] is None


def test_run_config_refuses_a_completion_longer_than_the_context():
    from psr.config import ConfigError, from_dict
    from psr.rounds import RunConfig

    with pytest.raises((ConfigError, ValueError), match="benchmarks.*max_new_tokens.*max_model_len"):
        from_dict(RunConfig, {"generation": {"max_model_len": 256}, "benchmarks": [{"max_new_tokens": 512}]})
