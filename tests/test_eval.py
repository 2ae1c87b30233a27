import json

import pytest

from psr.cli import main
from psr.generation import generate
from psr.sampling import SamplingConfig
from psr.steps import render_prompt


def test_psr_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", "tiny-random", "--task", "arithmetic", "--limit", "10", "--samples", "3",
               "--max-new-tokens", "12", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n"] == 10 and len(result["problems"]) == 10
    assert set(result["by_difficulty"]) == {f"{n} steps" for n in range(2, 7)}
    assert 0.0 <= result["accuracy"] <= 1.0 and "maj@3" in result and "pass@3" in result
    row = result["problems"][0]
    assert len(row["samples"]) == 3 and row["correct"] in (True, False) and row["gold"]
    assert "problems/min" in capsys.readouterr().out


def test_psr_eval_reports_bad_input(capsys):
    assert main(["eval", "--model", "no-such-model", "--task", "arithmetic"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-random", "--task", "gsm8k", "--data", "/no/such.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generation_is_batched_ordered_and_seeded(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in ["What is 1 + 1?", "A much longer question " * 5, "2 * 3?"]]
    greedy_b1 = generate(model, tok, prompts, max_new_tokens=8, batch_size=1, progress=False)
    greedy_b3 = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    assert greedy_b1 == greedy_b3  # left padding does not change greedy outputs
    fixed = SamplingConfig(policy="fixed", temperature=1.0)
    a = generate(model, tok, prompts, fixed, max_new_tokens=8, num_samples=2, seed=3, progress=False)
    b = generate(model, tok, prompts, fixed, max_new_tokens=8, num_samples=2, seed=3, progress=False)
    assert a == b and all(len(x) == 2 for x in a)
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tok, prompts, num_samples=2, progress=False)


def test_generation_stops_at_step_boundary(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, "What is 2 + 3?", ["Step 1: 2 + 3 = 5."])]
    steps = generate(model, tok, prompts, SamplingConfig(policy="fixed", temperature=1.5), max_new_tokens=60,
                     num_samples=6, stop_at_step=True, seed=0, progress=False)[0]
    for s in steps:
        assert "\nStep" not in s  # never runs into the next step


def test_evaluation_stops_at_the_answer_line_and_grades_the_same_text(tiny):
    """Rows stop once the line of their boxed answer ends; what is graded is the solution up to that line,
    with or without stopping, so stopping saves tokens and changes no grade."""
    import torch

    from psr.evaluate import EvalConfig, evaluate
    from psr.generation import StepBoundaryStopping, cut_after_answer
    from psr.tasks import TaskConfig

    text = "Step 1: 2 + 2 = 4.\nStep 2: So it is \\boxed{4}.\nStep 3: Or \\boxed{5}."
    assert cut_after_answer(text) == "Step 1: 2 + 2 = 4.\nStep 2: So it is \\boxed{4}."
    assert cut_after_answer("Step 1: \\boxed{4") == "Step 1: \\boxed{4"  # no complete answer: all of it
    model, tok = tiny
    prompt = tok("Q?", add_special_tokens=False)["input_ids"]

    def done(t):  # a fresh criterion per text: it keeps each row's scan state across decode steps
        stop = StepBoundaryStopping(tok, len(prompt), at_step=False)
        return bool(stop(torch.tensor([prompt + tok(t, add_special_tokens=False)["input_ids"]]), None)[0])

    assert not done("Step 1: 2 + 2 = 4.\nStep 2:")  # a whole solution goes on across steps
    assert not done("Step 2: So it is \\boxed{4}.")  # the answer's line has not ended yet
    assert done("Step 2: So it is \\boxed{4}.\n")
    cfg = dict(model="tiny-random", task=TaskConfig(name="arithmetic", max_steps=2), limit=4, max_new_tokens=12)
    on, off = evaluate(EvalConfig(**cfg), model, tok, progress=False), evaluate(EvalConfig(**cfg, stop_at_answer=False),
                                                                                model, tok, progress=False)
    assert [p["pred"] for p in on["problems"]] == [p["pred"] for p in off["problems"]]


def test_steps_right_counts_only_right_answers_reached_by_right_steps():
    """The scripted solutions a small model writes: a right chain, a right answer from a wrong step (lucky),
    a wrong answer, and a dataset without step truth (None, so no column is reported)."""
    from psr.evaluate import steps_right
    from psr.tasks.arithmetic import ArithmeticTask
    from psr.tasks.base import Problem, Task

    task = ArithmeticTask()
    p = Problem(id="a", question="Ava has 8 apples. ...", gold="48", reference_steps=[],
                meta={"chain": [[8, "*", 3, 24], [24, "*", 2, 48]]})
    right = "Step 1: Multiplying by 3: 8 * 3 = 24.\nStep 2: Multiplying by 2: 24 * 2 = 48. The answer is \\boxed{48}.\n"
    lucky = ("Step 1: Multiplying by 3: 8 * 3 = 24.\nStep 2: Multiplying by 2: 24 * 2 = 48.\n"
             "Step 3: Adding 2: 48 + 2 = 48. The answer is \\boxed{48}.\n")
    # what follows the answer line is not part of the solution (it is cut before grading)
    assert steps_right(task, p, right + "Step 3: Adding 1: 48 + 1 = 50.\n", True) is True
    assert steps_right(task, p, lucky, True) is False
    assert steps_right(task, p, right.replace("48", "47"), False) is False
    assert steps_right(Task(), p, right, True) is None
