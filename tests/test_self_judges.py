"""Self-judges beyond the paper (psr.self_judges): scripted rollouts for the consistency score, and both
modes through the real search on tiny-random (ties, rollbacks and pairs as with the LLM judge)."""

import importlib.util
from pathlib import Path

import pytest

from psr.judge import JudgeConfig
from psr.self_judges import (
    ConsistencyJudge,
    LikelihoodJudge,
    consensus,
    consistency_scores,
    make_judge,
    score_comparison,
)


def test_consistency_scores_are_shares_of_rollouts_reaching_the_consensus():
    cands = ["Step 1: 3 + 4 = 7.", "Step 1: 3 + 4 = 8.", "Step 1: so the total is \\boxed{14}", "Step 1: hmm", ""]
    rollouts = [
        ["Step 2: 7 * 2 = 14 \\boxed{14}", "Step 2: 7 * 2 = 14 \\boxed{14}", "Step 2: \\boxed{15}"],
        ["Step 2: 8 * 2 = 16 \\boxed{16}", "Step 2: \\boxed{14}", "Step 2: 8 * 2 = 16 \\boxed{16}"],
        None,  # gives the answer itself
        ["Step 2: and then", "Step 2: more", "Step 2: \\boxed{14} and later \\boxed{16}"],  # first answer counts
        [],  # empty candidate: no rollouts
    ]
    scores, top = consistency_scores(cands, rollouts)
    assert top == "14"
    assert scores == pytest.approx([2 / 3, 1 / 3, 1.0, 1 / 3, 0.0])
    assert consensus([None, "1/2", "0.5", "3"]) == "1/2"  # equivalent answers are one group
    assert consistency_scores(["a", "b"], [["no answer"], ["none"]]) == ([0.0, 0.0], None)  # nothing reached: tie


def test_score_comparison_ties_within_the_margin():
    comp = score_comparison([0.75, 0.5, 0.25], tie_margin=0.3)
    assert comp.wins == [[0, 0, 1], [0, 0, 0], [0, 0, 0]] and comp.scores == [1, 0, 0]
    assert comp.order_scores["0,2"] == pytest.approx(0.75) and comp.order_scores["2,0"] == pytest.approx(0.25)
    assert max(score_comparison([0.5, 0.5], 0.0).scores) == 0  # equal scores: the search's tie rule fires


def test_likelihood_reduction_min_scores_a_candidate_by_its_least_likely_token(tiny):
    """mean and min read the same token log-probabilities; min ranks by the weakest token, so a candidate with
    one doubtful token loses to one that is evenly likely even when its mean is higher."""
    from psr.judge_own import candidate_loglik, reduce_logprobs

    assert reduce_logprobs([-0.1, -0.1, -2.0]) == pytest.approx(-2.2 / 3)
    assert reduce_logprobs([-0.1, -0.1, -2.0], "min") == -2.0 and reduce_logprobs([], "min") == 0.0
    evenly, one_doubt = [-0.5, -0.5, -0.5], [-0.01, -0.01, -1.2]
    assert reduce_logprobs(one_doubt) > reduce_logprobs(evenly)
    assert reduce_logprobs(one_doubt, "min") < reduce_logprobs(evenly, "min")
    model, tok = tiny
    cands = ["Step 1: 2 + 3 = 5.", "Step 1: 2 + 3 = 6.", ""]
    steps = [{"question": "What is 2 + 3?", "previous_steps": [], "candidates": cands}]
    mean, low = candidate_loglik(model, tok, steps)[0], candidate_loglik(model, tok, steps, "min")[0]
    assert all(b <= a for a, b in zip(mean, low)) and low != mean
    judge = make_judge(model, tok, JudgeConfig(mode="likelihood", tie_margin=0.0, likelihood_reduction="min"))
    comp = judge.compare([(steps[0]["question"], [], steps[0]["candidates"])])[0]
    assert comp.scores[2] == 0 and comp.scores[0] == int(low[0] > low[1]) + 1  # an empty candidate never wins


@pytest.mark.parametrize("mode", ["consistency", "likelihood"])
def test_self_judges_drive_the_search_on_tiny_random(tmp_path, tiny, mode):
    from psr.config import from_dict
    from psr.search import SearchConfig, run_search

    model, tok = tiny
    judge = {"mode": mode, "tie_margin": 0.0, "consistency_rollouts": 2, "consistency_max_new_tokens": 8}
    assert isinstance(make_judge(model, tok, JudgeConfig(**judge)), (ConsistencyJudge, LikelihoodJudge))
    cfg = from_dict(SearchConfig, dict(model="tiny-random", limit=2, width=3, max_steps=2, max_step_tokens=6,
                                       out=str(tmp_path / "s"), judge=judge))
    stats = run_search(cfg, model, tok, progress=False)
    assert stats["problems"] == 2 and stats["judge_in_search"]["steps"] >= 2
    assert make_judge(model, tok, JudgeConfig(mode="truth")) is None


def test_consistency_scores_are_not_read_as_a_reasoning_judges_replies(tiny):
    """score_own (benchmarks/self_judge.py) reads replies as the generate mode's "i,j" -> text; the consistency
    judge keeps its consensus and shares apart, so a consistency measure reports no replies to check."""
    from psr.judge_own import score_own

    model, tok = tiny
    judge = make_judge(model, tok, JudgeConfig(mode="consistency", tie_margin=0.0, consistency_rollouts=2,
                                               consistency_max_new_tokens=8))
    cands = ["Step 1: 2 + 3 = 5.", "Step 1: 2 + 3 = 6.", "Step 1: 2 + 3 = 5."]
    step = {"problem_id": "p", "question": "What is 2 + 3?", "previous_steps": [], "candidates": cands,
            "candidate_correct": [True, False, True]}
    comp = judge.compare([(step["question"], [], cands)])[0]
    assert comp.replies == {} and len(comp.consistency["shares"]) == 3
    out = score_own(judge, [step])
    assert out["mixed_steps"] == 1 and "replies" not in out and "unparseable" not in out


def load_benchmark(name: str):
    """A script under benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_abstention_benchmark_scores_truth_free_signals_against_the_logged_truth(tmp_path, tiny):
    """benchmarks/abstention.py on a scripted search log: identical candidates are skipped, each signal is read
    from the candidates alone (the logged truth only grades it), and a signal that sorts the steps with a right
    candidate above those without has AUC 1."""
    import json

    abstention = load_benchmark("abstention")
    assert abstention.step_result("Step 2: 7 * 2 = 14.") == "14"
    assert abstention.step_result("Step 3: so 5 + 1 = 6, \\boxed{6}") == "6" and abstention.step_result("hmm") is None
    assert abstention.auc([3, 2], [1, 0]) == 1.0 and abstention.auc([1], [1]) == 0.5 and abstention.auc([], [1]) is None

    q = "A farm has 3 eggs. It gets 4 more. How many eggs now?"
    events = [{"previous_steps": [], "candidates": ["Step 1: 3 + 4 = 7."] * 3, "candidate_correct": [True] * 3},
              {"previous_steps": [], "candidates": ["Step 1: 3 + 4 = 7.", "Step 1: 3 + 4 = 8.", "Step 1: 3 + 4 = 8."],
               "candidate_correct": [True, False, False]},
              {"previous_steps": [], "candidates": ["Step 1: 3 + 4 = 9.", "Step 1: 3 + 4 = 8.", "Step 1: hmm"],
               "candidate_correct": [False, False, None]}]
    log = tmp_path / "search.jsonl"
    log.write_text(json.dumps({"question": q, "events": events}) + "\n")
    steps = abstention.judged_steps(str(log))
    assert [s["right"] for s in steps] == [[True, False, False], [False, False, False]]  # unanimous step skipped
    model, tok = tiny
    abstention.signals(steps, model, tok, rollouts=2)
    for s in steps:
        assert 0 <= s["agreement"] <= 1 and s["margin"] >= 0 and 0 <= s["consensus"] <= 1
    steps[0]["agreement"], steps[1]["agreement"] = 1.0, 0.0  # scripted: this signal separates perfectly
    m = abstention.measure(steps, "agreement")
    assert m["auc_some_right_vs_none"] == 1.0
    assert m["abstain"][1]["kept_with_no_right_candidate"] == 0 and m["abstain"][1]["kept_steps"] == 1


def test_judge_curve_reports_the_fit_on_its_training_rows_as_training_ended():
    """benchmarks/judge_curve.py: the summary's train_end is the mean of the last 10 logged steps (the issue asks
    to train until the fit on its own rows stops rising), not the first steps, and None where nothing was logged."""
    judge_curve = load_benchmark("judge_curve")
    history = [{"loss": 2.0, "mean_token_accuracy": 0.3}] * 5 + [{"loss": 0.1, "mean_token_accuracy": 0.9}] * 10
    log = {"log_history": history + [{"train_runtime": 1.0}]}
    assert judge_curve.train_end(log) == {"loss": 0.1, "mean_token_accuracy": 0.9}
    assert judge_curve.train_end({}) == {"loss": None, "mean_token_accuracy": None}
