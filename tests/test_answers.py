import pytest

from psr.answers import (
    extract_answer,
    final_answer,
    flexible_answer,
    gsm8k_gold,
    is_correct,
    is_correct_flexible,
    is_equivalent,
    last_boxed,
)
from tests.conftest import GSM8K, MATH500, jsonl_row, needs_shared

# (MATH500 line, an equivalent answer written differently, a wrong answer)
MATH_CASES = [
    (3, "\\frac{28}{6}", "\\frac{3}{14}"),  # fraction
    (9, "\\sqrt{117}", "3\\sqrt{12}"),  # radical
    (104, "(3, 4]", "[3,4)"),  # interval: open/closed ends matter
    (185, "(2, \\infty)", "[2,\\infty)"),
    (436, "(-\\infty,2)\\cup(3,\\infty)", "(-\\infty,3)\\cup(2,\\infty)"),
    (302, "5.4", "54"),  # units in the gold
    (167, "\\frac{270}{7}", "\\frac{7}{270}"),  # "degrees" in the gold
    (199, "10080", "1008"),  # thousands separator \\!
    (218, "11111111100", "1111111100"),
    (243, "32348", "3234.8"),  # currency and separator
    (8, "90", "45"),  # ^\\circ
    (37, "3,5,7", "3,5,8"),  # lists
]


@needs_shared
@pytest.mark.parametrize("line,equivalent,wrong", MATH_CASES)
def test_math500_golds(line, equivalent, wrong):
    gold = last_boxed(jsonl_row(MATH500, line)["answer"])
    assert is_correct(gold, f"Step 3: so the answer is \\boxed{{{equivalent}}}.")
    assert not is_correct(gold, f"Step 3: so the answer is \\boxed{{{wrong}}}.")


# (GSM8K line, model-style solution that is right)
GSM8K_CASES = [
    (1, "Step 1: 48 / 2 = 24.\nStep 2: 48 + 24 = 72. The answer is \\boxed{72}."),
    (2, "Step 1: She earns $10. The answer is \\boxed{\\$10}."),
    (2, "Step 1: 0.2 x 50 = 10\n#### 10"),
    (2, "Step 1: She earned 0.2 * 50 = 10 dollars. The answer is 10."),
]


@needs_shared
@pytest.mark.parametrize("line,solution", GSM8K_CASES)
def test_gsm8k_golds(line, solution):
    gold = gsm8k_gold(jsonl_row(GSM8K, line)["answer"])
    assert is_correct(gold, solution)
    assert not is_correct(gold, solution.replace(gold, str(int(gold) + 1)))


@needs_shared
def test_gsm8k_thousands_separator_in_prediction():
    # Find a real GSM8K gold >= 1000 and answer it with a comma.
    import json

    with GSM8K.open() as f:
        gold = next(g for g in (gsm8k_gold(json.loads(line)["answer"]) for line in f) if g.isdigit() and int(g) >= 1000)
    with_commas = f"{int(gold):,}"
    assert "," in with_commas
    assert is_correct(gold, f"The answer is \\boxed{{{with_commas}}}.")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Step 2: 3 + 4 = 7. The answer is \\boxed{7}.", "7"),
        ("\\boxed{1} then corrected: \\boxed{\\frac{1}{2}}", "1"),  # the first answer it commits to decides
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} end", "\\frac{\\sqrt{2}}{2}"),
        ("unclosed \\boxed{12", None),  # no complete answer: no answer, not "the last number"
        ("So the total is 1,250 apples\n#### 1,250", "1,250"),
        ("The answer is: 42.", "42"),
        ("The answer is 5. Step 2: so \\boxed{6}", "5"),
        ("Step 1: The answer is the sum of 3 and 4.\nStep 2: 3 + 4 = 7 \\boxed{7}", "7"),  # no value: no commitment
        ("We get 3 then 17 apples", None),
        ("no answer here", None),
    ],
)
def test_extract_answer_takes_the_first_final_answer(text, expected):
    assert extract_answer(text) == expected == final_answer(text)


# Texts a model writes that hold numbers but no final answer: the old grader took the last number.
UNANSWERED = [
    ("3", "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nStep 3:"),  # cut off at max_new_tokens: "3" of "Step 3:"
    ("1", "Here is the plan:\n20. Add them\n21. 1"),  # a numbered list
    ("12", "Step 1: She has 5 apples and buys 7, so 5 + 7 = 12"),  # a half-written solution
]


@pytest.mark.parametrize("gold,text", UNANSWERED)
def test_a_text_without_a_final_answer_is_wrong(gold, text):
    assert final_answer(text) is None and not is_correct(gold, text)
    assert is_correct_flexible(gold, text)  # what the lenient second metric (and the old default) credited


def test_a_later_right_answer_does_not_rescue_a_wrong_first_one():
    text = "Step 2: 3 * 4 = 11, so \\boxed{11}\nStep 3: wait, \\boxed{12}"
    assert not is_correct("12", text) and is_correct("11", text)
    assert flexible_answer(text) == "12"


def test_equivalence_edge_cases():
    assert is_equivalent("0.5", "\\frac{1}{2}")
    assert is_equivalent("18", "\\$18")
    assert not is_equivalent("18", None)
    assert not is_equivalent("18", "")
    assert not is_equivalent("7", "8")


def test_math_verify_off_main_thread():
    import threading

    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ok", is_equivalent("\\frac{1}{2}", "0.5")))
    t.start()
    t.join()
    assert out["ok"] is True
