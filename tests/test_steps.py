from psr.generation import cut_at_step_boundary
from psr.steps import format_solution, has_final_answer, render_prompt, split_steps


def test_split_and_format_round_trip():
    steps = ["Step 1: 2 + 3 = 5.", "Step 2: 5 * 2 = 10. The answer is \\boxed{10}."]
    text = format_solution(steps)
    assert text.endswith("\n") and split_steps(text) == steps
    assert split_steps("Sure!\nStep 1: a\nmore of a\nStep 2: b") == ["Step 1: a\nmore of a", "Step 2: b"]
    assert split_steps("no markers at all") == ["no markers at all"]


def test_has_final_answer():
    assert has_final_answer("so \\boxed{\\frac{1}{2}}.")
    assert not has_final_answer("so \\boxed{\\frac{1}{2}")
    assert not has_final_answer("no box")


def test_cut_at_step_boundary():
    assert cut_at_step_boundary("Step 2: 5 + 1 = 6.\nStep 3: 6 * 2 = 12.") == "Step 2: 5 + 1 = 6."
    assert cut_at_step_boundary("Step 2: x = 6.\n  Step 3: y") == "Step 2: x = 6."
    assert cut_at_step_boundary("Step 3: 6 * 2 = 12. The answer is \\boxed{12}.\nThanks!") == \
        "Step 3: 6 * 2 = 12. The answer is \\boxed{12}."
    assert cut_at_step_boundary("Step 1: multi\nline step") == "Step 1: multi\nline step"


def test_render_prompt_ends_on_a_step_boundary(tiny):
    _, tok = tiny
    head = render_prompt(tok, "What is 2 + 3?")
    assert head.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in head
    with_steps = render_prompt(tok, "What is 2 + 3?", ["Step 1: 2 + 3 = 5."])
    assert with_steps == head + "Step 1: 2 + 3 = 5.\n"
