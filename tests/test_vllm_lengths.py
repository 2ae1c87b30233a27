"""The length guard on the vLLM engine (psr/lengths.py): with a small ``max_model_len`` a prompt longer than
the context used to end the rank with vLLM's ValueError (and again on every resume). Now it is not sent: an
empty completion, a uniform verdict, the judge leaving earlier steps out, evaluation counting it too_long.
Runs where vLLM imports (``make test-vllm``); skipped elsewhere."""

import pytest

vllm = pytest.importorskip("vllm")

from psr.engines import GenerationConfig, load_generator  # noqa: E402
from psr.evaluate import EvalConfig, evaluate  # noqa: E402
from psr.generation import generate  # noqa: E402
from psr.judge import JudgeConfig, StepJudge  # noqa: E402
from psr.lengths import context_limit, token_count  # noqa: E402
from psr.sampling import SamplingConfig  # noqa: E402
from psr.steps import render_prompt  # noqa: E402
from psr.tasks import TaskConfig, make_task  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]
CONTEXT = 256


@pytest.fixture(scope="module")
def engine():
    engine, tok = load_generator("smollm2-135m", gen=GenerationConfig(backend="vllm", kv_cache_gb=0.5,
                                                                       max_model_len=CONTEXT))
    yield engine, tok
    engine.close()


def test_long_prompts_are_not_sent_and_short_ones_are_cut_at_the_context(engine):
    engine, tok = engine
    assert context_limit(engine) == CONTEXT
    p = make_task(TaskConfig()).problems("test", 1, seed=0)[0]
    short = render_prompt(tok, p.question)
    long = render_prompt(tok, p.question, ["Step 1: " + "one plus one is two. " * 60])
    assert token_count(tok, long) > CONTEXT
    out = generate(engine, tok, [short, long, short], SamplingConfig(policy="greedy"), max_new_tokens=4000,
                   progress=False)
    assert out[1] == [""] and out[0] == out[2] and out[0][0]
    assert token_count(tok, short) + token_count(tok, out[0][0]) <= CONTEXT + 1
    probs = engine.choice_probs([long, short], [tok("A")["input_ids"][0], tok("B")["input_ids"][0]])
    assert probs[0].tolist() == [0.5, 0.5]


def test_generate_mode_judge_leaves_earlier_steps_out(engine):
    engine, tok = engine
    p = make_task(TaskConfig()).problems("test", 1, seed=0)[0]
    steps = [f"Step {i}: {i} + {i} = {2 * i}." for i in range(1, 20)]
    judge = StepJudge(engine, tok, JudgeConfig(mode="generate", max_new_tokens=16))
    comp = judge.compare([(p.question, steps, ["Step 20: 40.", "Step 20: 41."])])[0]
    assert comp.elided > 0 and not comp.too_long and len(comp.replies) == 2


def test_eval_counts_problems_without_room(engine, tmp_path):
    engine, tok = engine
    r = evaluate(EvalConfig(model="smollm2-135m", limit=2, max_new_tokens=200), engine, tok, progress=False)
    assert r["too_long"] == 2 and r["accuracy"] == 0
