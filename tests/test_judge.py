"""The step judge and the SRLM rubric scorer: prefix reuse equals plain scoring, float32 scores, the tie margin."""

import copy
import random
from itertools import permutations

import pytest
import torch

from psr.judge import JudgeConfig, StepJudge, common_prefix_length
from psr.search import SearchConfig, search_chunk
from psr.tasks import ArithmeticTask

QUESTION = "Mia has 19 apples. She gives away 5 apples and then buys 7 more. How many apples does she have now?"
# Candidates that leave each other at different token positions: late (14 vs 13 in the result, or only
# the tail), early (prose vs an equation), in the middle (+ vs -).
CANDIDATES = [
    "Step 2: 19 - 5 = 14. Mia has 14 apples, so the answer is \\boxed{14}.",
    "Step 2: 19 + 5 = 24.",
    "Step 2: Mia gives away 5 apples.",
    "Step 2: 19 - 5 = 13. Mia has 13 apples, so the answer is \\boxed{13}.",
    "Step 2: 19 - 5 = 14.",
    "Step 2: 19 - 5 = 14 apples are left after giving some away.",
]


def test_common_prefix_is_the_minimum_over_rows():
    rows = [[1, 2, 3, 4, 5], [1, 2, 9, 9, 9], [1, 2, 3, 4, 7]]  # the last row diverges late, the middle one early
    assert common_prefix_length(rows) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 3
    assert common_prefix_length([[5, 6], [7]]) == 0


def _p_a(judge, width):
    return judge.compare([(QUESTION, ["Step 1: Mia starts with 19 apples."], CANDIDATES[:width])])[0].order_scores


@pytest.mark.parametrize("width", [3, 4, 5, 6])
def test_prefix_reuse_gives_the_plain_p_a_for_every_ordered_pair(tiny, width):
    """Every ordered comparison of a step, scored through the shared-prefix KV cache, equals scoring its
    own full prompt; before the fix rows that diverged earlier than the last one were scored on
    another row's tokens."""
    model, tok = tiny
    reuse = _p_a(StepJudge(model, tok, JudgeConfig(prefix_reuse=True, batch_size=7)), width)
    plain = _p_a(StepJudge(model, tok, JudgeConfig(prefix_reuse=False, batch_size=64)), width)
    assert set(reuse) == set(plain) and len(reuse) == width * (width - 1)
    for key in plain:
        assert reuse[key] == pytest.approx(plain[key], abs=1e-4), key


@pytest.mark.embedded
def test_prefix_reuse_matches_plain_on_the_embedded_model():
    """The same check with the real tokenizer and weights, at width 4 (the experiment's width)."""
    from psr.models import load_model

    model, tok = load_model("smollm2-135m")
    judge = StepJudge(model, tok, JudgeConfig(prefix_reuse=True))
    prompts = [judge.prompt(QUESTION, ["Step 1: Mia starts with 19 apples."], CANDIDATES[i], CANDIDATES[j], True)
               for i, j in permutations(range(4), 2)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    first_divergence = [next(k for k, (x, y) in enumerate(zip(ids[0], r)) if x != y) for r in ids[1:]]
    assert common_prefix_length(ids) == min(first_divergence) < max(first_divergence)  # rows do diverge apart
    reuse = _p_a(judge, 4)
    plain = _p_a(StepJudge(model, tok, JudgeConfig(prefix_reuse=False)), 4)
    for key in plain:
        assert reuse[key] == pytest.approx(plain[key], abs=1e-4), key


def _aggregate(tok, p_a: dict, width: int, **cfg):
    judge = StepJudge(None, tok, JudgeConfig(aggregation="sum", **cfg))
    orders = list(permutations(range(width), 2))
    return judge._aggregate(width, orders, [p_a[o] for o in orders], logits=True)


def test_sum_aggregation_ties_a_judge_at_chance_even_at_even_widths(tiny):
    """A judge with only a position bias (P(A) = 0.8 whatever it reads, plus noise) has no preference.
    Without a margin every pair gets a winner, so at width 4 the scores can never all be equal and the
    tie rule could not fire; with the default margin its comparisons stay undecided and the step ties."""
    _, tok = tiny
    rng = random.Random(0)
    for _ in range(20):
        chance = {o: 0.8 + rng.uniform(-0.02, 0.02) for o in permutations(range(4), 2)}
        assert len(set(_aggregate(tok, chance, 4, tie_margin=0.0).scores)) > 1  # the old rule: never a tie
        tied = _aggregate(tok, chance, 4)
        assert len(set(tied.scores)) == 1 and tied.scores == [0, 0, 0, 0]
    # A judge that does prefer candidate 2 (both orders) still separates it.
    clear = {(i, j): 0.9 if i == 2 else (0.1 if j == 2 else 0.5) for i, j in permutations(range(4), 2)}
    assert _aggregate(tok, clear, 4).scores == [0, 0, 3, 0]
    with pytest.raises(ValueError, match="tie_margin"):
        JudgeConfig(tie_margin=1.5)


def test_search_with_a_chance_judge_rolls_back_and_reports_its_ties(tiny):
    from psr.pairs import build_pairs, pair_stats

    _, tok = tiny
    rng = random.Random(1)

    class ChanceJudge:
        def compare(self, items):
            return [_aggregate(tok, {o: 0.5 + rng.uniform(-0.03, 0.03) for o in permutations(range(len(c)), 2)},
                               len(c)) for _, _, c in items]

    problem = ArithmeticTask().problems("train", 4)[0]
    propose = lambda items: [[f"Step {len(p) + 1}: {k} + 1 = {k + 1}." for k in range(4)] for _, p in items]  # noqa: E731
    trace = search_chunk([problem], ArithmeticTask(), propose, ChanceJudge(), SearchConfig(width=4, max_rollbacks=2))[0]
    assert trace["status"] == "gave_up" and trace["rollbacks"] == 3
    stats = pair_stats([trace], build_pairs([trace], tok))
    assert stats["ties"] == 3 and stats["tie_rate"] == 1.0 and stats["pairs"] == 0


def test_srlm_rubric_scores_bf16_models_in_float32(tiny):
    """The SRLM scorer reads its digit probabilities as the step judge reads its letters: float32, from
    the last hidden state (it read bf16-rounded logits of the whole vocabulary)."""
    from psr.srlm import RubricJudge

    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    items = [("What is 5 - 2?", "Step 1: 5 - 2 = 3. The answer is \\boxed{3}."), ("What is 5 - 2?", "Step 1: 7.")]
    judge = RubricJudge(bf16, tok, batch_size=1)
    scores, unparseable = judge.score(items)
    expected = []
    with torch.no_grad():
        for q, r in items:
            ids = tok(judge._prompt(q, r, True), return_tensors="pt", add_special_tokens=False)
            hidden = bf16.get_decoder()(**ids).last_hidden_state[0, -1].double()
            probs = torch.softmax(bf16.get_output_embeddings().weight[judge.digit_ids].double() @ hidden, dim=-1)
            expected.append((probs * torch.arange(6.0, dtype=torch.float64)).sum().item())
    assert unparseable == 0 and scores == pytest.approx(expected, abs=1e-5)


def test_judge_on_its_own_candidates_against_a_random_pick(tiny):
    """own_candidates samples and labels the model's next steps after each right prefix; score_own counts
    how often a judge keeps a right one at mixed steps. A judge that knows the truth keeps one every time."""
    from psr.judge import Comparison
    from psr.judge_own import mixed_steps, own_candidates, score_own, wilson

    model, tok = tiny
    task = ArithmeticTask(min_steps=2, max_steps=3)
    problems = task.problems("test", 2, seed=1)
    steps = own_candidates(model, tok, task, problems, width=3, max_step_tokens=8, progress=False)
    assert len(steps) == sum(len(p.reference_steps) for p in problems)
    assert all(len(s["candidates"]) == 3 and len(s["candidate_correct"]) == 3 for s in steps)
    # tiny-random writes no right step: script the candidates of one step instead
    p = problems[0]
    scripted = [{"question": p.question, "previous_steps": [],
                 "candidates": ["Step 1: x", p.reference_steps[0], "Step 1: y"],
                 "candidate_correct": [None, True, False]}] * 4 + steps

    class Oracle:
        def compare(self, items):
            out = []
            for _, prev, cands in items:
                r = [task.check_step(p, prev, c) is True for c in cands]
                wins = [[int(r[i] and not r[j]) for j in range(len(r))] for i in range(len(r))]
                out.append(Comparison({}, wins, [sum(w) for w in wins], 0))
            return out

    summary = score_own(Oracle(), scripted)
    assert summary["mixed_steps"] == len(mixed_steps(scripted)) >= 4
    assert summary["kept_right"] == 1.0 and summary["random_right"] < 1.0 and summary["gain_over_random"] > 0
    assert wilson(5, 10) == (0.2366, 0.7634)


def test_generate_mode_on_own_candidates_keeps_its_replies_and_checks_reasoning_lines(tiny):
    """A generate-mode judge (the reasoning judge's mode) through score_own: every reply is kept with its step,
    and the share without a verdict is reported. reasoning_lines holds each line of a recompute-style reply
    against the truth: the task's own justification is right throughout, one with flipped lines is not."""
    from psr.judge import JudgeConfig, StepJudge, judge_reply
    from psr.judge_own import reasoning_lines, score_own

    model, tok = tiny
    task = ArithmeticTask(min_steps=2, max_steps=3)
    p = task.problems("test", 1, seed=1)[0]
    a, op, b, r = p.meta["chain"][0]
    cands = [p.reference_steps[0], f"Step 1: {a} {op} {b} = {r + 1}."]
    steps = [{"problem_id": p.id, "question": p.question, "previous_steps": [], "candidates": cands,
              "candidate_correct": [True, False]}]
    judge = StepJudge(model, tok, JudgeConfig(mode="generate", aggregation="sum", tie_margin=0.0, max_new_tokens=8))
    summary = score_own(judge, steps)
    assert summary["mixed_steps"] == 1 and 0.0 <= summary["unparseable"] <= 1.0
    assert sorted(summary["replies"][0]["replies"]) == ["0,1", "1,0"]  # both orders, raw text kept

    def reply(i, j):  # what a perfect reasoning judge writes with candidate i shown as A
        verdict = "A" if i == 0 else "B"
        return judge_reply(verdict, task.recompute(p, [], {"A": cands[i], "B": cands[j]}))

    perfect = [{**steps[0], "replies": {"0,1": reply(0, 1), "1,0": reply(1, 0)}}]
    assert reasoning_lines(task, {p.id: p}, perfect) == {"next_step_right": 1.0, "replies": 2,
                                                         "candidate_lines_right": 1.0, "candidate_lines": 4}
    flipped = [{**perfect[0], "replies": {k: v.replace("right.", "X").replace(", wrong", ", right.")
                                          for k, v in perfect[0]["replies"].items()}}]
    assert reasoning_lines(task, {p.id: p}, flipped)["candidate_lines_right"] == 0.0


def test_own_candidates_re_read_under_another_tie_margin():
    """The same P(A) values, re-read: a weak lean towards the right candidate ties at margin 0.1 (the search
    rolls back) and picks it at margin 0; a lean under the margin never flips the direction."""
    from psr.judge import Comparison
    from psr.judge_own import score_own, summed_scores

    # candidate 0 right, 1 wrong: P(0 better) 0.55 when shown first, 0.52 when shown second -> strength 0.07
    comp = Comparison({"0,1": 0.55, "1,0": 0.48}, [[0, 0], [0, 0]], [0, 0], 0)
    assert summed_scores(comp, 2, 0.1) == [0, 0] and summed_scores(comp, 2, 0.0) == [1, 0]
    assert summed_scores(comp, 2, 0.05) == [1, 0]

    class Fixed:
        def compare(self, items):
            return [comp for _ in items]

    steps = [{"question": "q", "previous_steps": [], "candidates": ["Step 1: a", "Step 1: b"],
              "candidate_correct": [True, False]}] * 3
    summary = score_own(Fixed(), steps, margins=(0.1, 0.0))
    assert summary["kept_right"] == 0.0 and summary["ties"] == 1.0
    assert summary["by_margin"]["0.1"]["ties"] == 1.0
    assert summary["by_margin"]["0.0"]["kept_right"] == 1.0 and summary["by_margin"]["0.0"]["ties"] == 0.0


def test_likelihood_view_tells_a_judge_that_follows_the_policy(tiny):
    """A judge that leans towards the likelier candidate sides with it on every pair; the likeliest-pick
    judge is scored like any other. candidate_loglik gives one finite mean log-prob per candidate."""
    from psr.judge import Comparison
    from psr.judge_own import candidate_loglik, likelihood_view

    steps = [{"question": "q", "previous_steps": [], "candidates": ["Step 1: a", "Step 1: b", "Step 1: c"],
              "candidate_correct": [False, True, False]}] * 2
    lls = [[-0.5, -2.0, -1.0]] * 2  # the wrong candidate 0 is the likeliest
    # P(A) when i is shown first: high for the likelier of each pair in both orders
    scores = {f"{i},{j}": 0.8 if lls[0][i] > lls[0][j] else 0.2 for i in range(3) for j in range(3) if i != j}
    comp = Comparison(scores, [[0] * 3] * 3, [0, 0, 0], 0)
    view = likelihood_view(steps, [comp, comp], lls)
    assert view["judge_sides_with_likelier"] == 1.0 and view["pairs"] == 6
    assert view["judge_sides_with_likelier_right_vs_wrong"] == 1.0 and view["pairs_right_vs_wrong"] == 4
    assert view["likeliest_kept_right"] == 0.0
    flipped = Comparison({k: 1 - v for k, v in scores.items()}, [[0] * 3] * 3, [0, 0, 0], 0)
    assert likelihood_view(steps, [flipped, flipped], lls)["judge_sides_with_likelier"] == 0.0

    model, tok = tiny
    ll = candidate_loglik(model, tok, steps[:1])
    assert len(ll) == 1 and len(ll[0]) == 3 and all(x < 0 for x in ll[0])
    # candidates of unequal length share one padded batch: each scores as it does alone
    uneven = {**steps[0], "candidates": ["Step 1: a", "Step 1: a much longer step = 42"]}
    together = candidate_loglik(model, tok, [uneven])[0]
    alone = [candidate_loglik(model, tok, [{**uneven, "candidates": [c]}])[0][0] for c in uneven["candidates"]]
    assert together == pytest.approx(alone, abs=1e-4)


def test_eft_rows_are_written_in_the_prompt_the_judge_is_asked_with(tiny):
    """A custom judge.template must reach the EFT rows too, or the judge is trained on another prompt."""
    from psr.train.sft import generate_eft

    _, tok = tiny
    template = "Q: {question}\nSo far: {previous}\nA: {step_a}\nB: {step_b}\nWhich is right?"
    judge = StepJudge(None, tok, JudgeConfig(template=template))
    rows = generate_eft(ArithmeticTask(), tok, 4, template=template)
    assert all(r["prompt"] == judge.prompt(r["question"], r["previous_steps"], r["step_a"], r["step_b"], False)
               for r in rows)
    default = generate_eft(ArithmeticTask(), tok, 4)
    assert all(r["prompt"] != judge.prompt(r["question"], r["previous_steps"], r["step_a"], r["step_b"], False)
               for r in default)
