import random

import pytest

from psr.steps import has_final_answer, split_steps
from psr.tasks import ArithmeticTask, TaskConfig, make_task
from psr.tasks.arithmetic import CORRUPTIONS, OPS


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask()


@pytest.fixture(scope="module")
def problems(task):
    return task.problems("train", 300) + task.problems("test", 100)


def test_reference_steps_and_answer_are_right(task, problems):
    for p in problems:
        chain = p.meta["chain"]
        assert len(p.reference_steps) == len(chain) == p.meta["n_steps"]
        value = chain[0][0]
        for k, (a, op, b, result) in enumerate(chain):
            assert a == value and OPS[op](a, b) == result and result >= 0
            value = result
            assert task.check_step(p, p.reference_steps[:k], p.reference_steps[k]) is True
            assert p.reference_steps[k].startswith(f"Step {k + 1}: ")
        assert str(value) == p.gold
        assert task.check_answer(p, "\n".join(p.reference_steps))
        assert has_final_answer(p.reference_steps[-1]) and not any(map(has_final_answer, p.reference_steps[:-1]))


def test_every_corruption_is_really_wrong(task, problems):
    rng = random.Random(0)
    for p in problems:
        for k in range(len(p.reference_steps)):
            for kind in CORRUPTIONS:
                bad = task.corrupt_step(p, k, kind, rng)
                assert bad != p.reference_steps[k]
                assert task.check_step(p, p.reference_steps[:k], bad) is False, (kind, p.reference_steps, k, bad)


def test_check_step_on_model_style_steps(task):
    p = task.problems("test", 1)[0]
    a, op, b, r = p.meta["chain"][0]
    assert task.check_step(p, [], f"Step 1: We compute {a} {op} {b} = {r} items.") is True
    assert task.check_step(p, [], f"Step 1: We compute {a} {op} {b} = {r + 1} items.") is False
    assert task.check_step(p, [], "Step 1: Let us think about the story.") is None
    assert task.check_step(p, [], f"Step 1: The answer is \\boxed{{{p.gold}}}.") is (len(p.meta["chain"]) == 1)
    # Solved already: any further computation is off the path.
    assert task.check_step(p, p.reference_steps, "Step 9: 1 + 1 = 2.") is False
    # The last step must give the answer: its right computation alone stops short of it (a model that
    # writes it goes on computing), and the answer on its own after that is still right.
    *before, final = p.reference_steps
    a, op, b, r = p.meta["chain"][-1]
    assert task.check_step(p, before, final) is True
    assert task.check_step(p, before, f"Step {len(before) + 1}: {a} {op} {b} = {r}.") is False
    assert task.check_step(p, p.reference_steps, f"Step 9: The answer is \\boxed{{{p.gold}}}.") is True


def test_splits_are_disjoint_and_reproducible(task):
    train = {p.question for p in task.problems("train", 2000)}
    test = [p.question for p in task.problems("test", 400)]
    assert not train & set(test)
    assert test == [p.question for p in task.problems("test", 400)]
    assert test != [p.question for p in task.problems("test", 400, seed=1)]


def test_difficulty_knobs():
    task = make_task(TaskConfig(name="arithmetic", min_steps=3, max_steps=4, max_operand=9))
    ps = task.problems("test", 40)
    assert {p.meta["n_steps"] for p in ps} == {3, 4}
    assert sum(p.meta["n_steps"] == 3 for p in ps) == 20
    assert all(len(split_steps("\n".join(p.reference_steps))) == p.meta["n_steps"] for p in ps)
    assert all(b <= 9 for p in ps for _, op, b, _ in p.meta["chain"])
    with pytest.raises(ValueError, match="min_steps"):
        ArithmeticTask(min_steps=5, max_steps=2)


def test_recompute_names_the_next_step_and_why_each_candidate_is_right_or_wrong(task, problems):
    """The exact justification a reasoning judge learns: its line for a candidate says "right" exactly when the
    step check does, and a miscalculation is recomputed."""
    rng = random.Random(1)
    for p in problems[:100]:
        for k, (a, op, b, r) in enumerate(p.meta["chain"]):
            previous, good = p.reference_steps[:k], p.reference_steps[k]
            for kind in CORRUPTIONS:
                bad = task.corrupt_step(p, k, kind, rng)
                lines = task.recompute(p, previous, {"A": bad, "B": good}).split("\n")
                assert lines[0].startswith(f"Next step: {a} {op} {b} = {r}")
                assert lines[1].startswith("A: ") and ", wrong" in lines[1], (kind, bad, lines)
                assert lines[2].startswith("B: ") and lines[2].endswith(", right."), (good, lines)
    p = problems[0]
    a, op, b, r = p.meta["chain"][0]
    text = task.recompute(p, [], {"A": f"Step 1: {a} {op} {b} = {r + 1}.", "B": "Step 1: Let us think."})
    assert text.split("\n")[1:] == [f"A: {a} {op} {b} = {r + 1}, wrong: {a} {op} {b} = {r}.", "B: no calculation."]
    *before, _ = p.reference_steps  # the last step's right calculation without the answer
    a, op, b, r = p.meta["chain"][-1]
    short = task.recompute(p, before, {"A": f"Step {len(before) + 1}: {a} {op} {b} = {r}."}).split("\n")[1]
    assert short == f"A: {a} {op} {b} = {r}, wrong: the last step gives the answer."
