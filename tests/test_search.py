import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psr.config import ConfigError
from psr.judge import Comparison, JudgeConfig, StepJudge, judge_reply, parse_verdict, truth_comparison
from psr.pairs import PairsConfig, build_pairs, pair_stats, truth_mix
from psr.search import SearchConfig, run_search, search_chunk
from psr.tasks import ArithmeticTask, TaskConfig
from psr.tasks.arithmetic import CORRUPTIONS

ROOT = Path(__file__).resolve().parents[1]


class ScriptedJudge:
    """Prefers the candidate with the higher ``rank(text)``; equal ranks are no preference."""

    def __init__(self, rank):
        self.rank = rank

    def compare(self, items):
        out = []
        for _, _, cands in items:
            r = [self.rank(c) for c in cands]
            wins = [[int(r[i] > r[j]) for j in range(len(r))] for i in range(len(r))]
            out.append(Comparison({}, wins, [sum(w) for w in wins], 0))
        return out


def scripted_proposer(script):
    """``script(question, path) -> candidates``; records every call."""
    calls = []

    def propose(items):
        calls.append(items)
        return [script(q, list(path)) for q, path in items]

    propose.calls = calls
    return propose


@pytest.fixture
def problem():
    return ArithmeticTask().problems("train", 10)[3]  # a problem with several steps


def _reference_script(p, width=4):
    """Right step ranked 3, two distractors ranked 1 and 0, a duplicate of the right one."""
    def script(question, path):
        k = len(path)
        right = p.reference_steps[k] if k < len(p.reference_steps) else "Step 99: done"
        return [f"Step {k + 1}: 2 + 2 = 5.", right, f"Step {k + 1}: 3 + 3 = 7.", right][:width]
    return script


def _rank_right(p):
    steps = set(p.reference_steps)
    return lambda c: 3 if c in steps else (1 if "2 + 2" in c else 0)


def test_search_picks_argmax_and_argmin_and_stops_at_answer(problem):
    task = ArithmeticTask()
    cfg = SearchConfig(width=4, max_steps=20)
    proposer, judge = scripted_proposer(_reference_script(problem)), ScriptedJudge(_rank_right(problem))
    trace = search_chunk([problem], task, proposer, judge, cfg)[0]
    assert trace["path"] == problem.reference_steps and trace["status"] == "answered" and trace["final_correct"]
    for e in trace["events"]:
        assert e["scores"] == [1, 2, 0, 2]
        assert e["best"] == 1 and e["worst"] == 2 and e["kept"]  # ties broken towards the first index
        assert e["candidate_correct"][1] is True and e["candidate_correct"][0] is False
    pairs = build_pairs([trace], _FakeTok(), PairsConfig())
    assert len(pairs) == len(problem.reference_steps)
    assert all(p["chosen_correct"] and not p["rejected_correct"] and p["margin"] == 2 for p in pairs)
    assert pair_stats([trace], pairs)["truth"]["chosen_right_and_rejected_wrong"] == 1.0
    n = len(pairs)
    assert pair_stats([trace], pairs)["truth"]["mix"] == {"right_over_wrong": n, "right_over_right": 0,
                                                          "wrong_over_wrong": 0, "wrong_over_right": 0}
    flipped = [{**p, "chosen_correct": p["rejected_correct"], "rejected_correct": p["chosen_correct"]} for p in pairs]
    assert truth_mix(flipped + [{**pairs[0], "chosen_correct": False}]) == {
        "right_over_wrong": 0, "right_over_right": 0, "wrong_over_wrong": 1, "wrong_over_right": n}


def test_tie_rolls_back_one_step_and_drops_its_pair(problem):
    task = ArithmeticTask()
    attempts = {"n": 0}
    base = _reference_script(problem)

    def script(question, path):
        if len(path) == 2 and attempts["n"] == 0:  # first visit of step 3: all candidates alike
            attempts["n"] += 1
            return ["Step 3: same"] * 4
        return base(question, path)

    rank = _rank_right(problem)
    judge = ScriptedJudge(lambda c: 5 if c == "Step 3: same" else rank(c))
    trace = search_chunk([problem], task, scripted_proposer(script), judge, SearchConfig(width=4))[0]
    ties = [e for e in trace["events"] if e["tie"]]
    assert len(ties) == 1 and ties[0]["step_index"] == 2 and trace["rollbacks"] == 1
    rolled = [e for e in trace["events"] if e.get("rolled_back")]
    assert len(rolled) == 1 and rolled[0]["step_index"] == 1  # the step before the tie was dropped ...
    pairs = build_pairs([trace], _FakeTok())
    assert [p["step_index"] for p in pairs] == list(range(len(problem.reference_steps)))  # ... and redone once
    assert trace["path"] == problem.reference_steps
    # keep_rolled_back: the dropped step's pair comes back, in the order the search made it.
    pairs = build_pairs([trace], _FakeTok(), PairsConfig(keep_rolled_back=True))
    assert [p["step_index"] for p in pairs] == [0, 1, 1] + list(range(2, len(problem.reference_steps)))
    stats = pair_stats([trace], pairs)
    assert stats["pairs_from_rolled_back_steps"] == 1 and stats["kept_steps_without_pair"] == 0


def test_rollbacks_are_bounded_and_max_steps_stops(problem):
    task = ArithmeticTask()
    always_tied = search_chunk([problem], task, scripted_proposer(lambda q, p: ["Step 1: x"] * 3),
                               ScriptedJudge(lambda c: 0), SearchConfig(width=3, max_rollbacks=2))[0]
    assert always_tied["status"] == "gave_up" and always_tied["rollbacks"] == 3 and always_tied["path"] == []
    endless = search_chunk([problem], task, scripted_proposer(lambda q, p: [f"Step {len(p) + 1}: a", "b"]),
                           ScriptedJudge(lambda c: len(c)), SearchConfig(width=2, max_steps=5))[0]
    assert endless["status"] == "max_steps" and len(endless["path"]) == 5
    assert len(build_pairs([endless], _FakeTok())) == 5


def test_keep_unanimous_keeps_a_step_written_every_time_and_goes_on(problem):
    """The real model's case: the same right step four times (v4's PSR round 1 gave up on 13 of 48 problems so).
    The paper's rule rolls back and gives up; keep_unanimous keeps it without a pair and judges the next step."""
    task = ArithmeticTask()
    base = _reference_script(problem)

    def script(question, path):
        return [problem.reference_steps[0]] * 4 if not path else base(question, path)

    judge = ScriptedJudge(_rank_right(problem))
    paper = search_chunk([problem], task, scripted_proposer(script), judge, SearchConfig(width=4, max_rollbacks=2))[0]
    assert paper["status"] == "gave_up" and paper["path"] == [] and build_pairs([paper], _FakeTok()) == []
    kept = search_chunk([problem], task, scripted_proposer(script), judge,
                        SearchConfig(width=4, keep_unanimous=True))[0]
    assert kept["status"] == "answered" and kept["path"] == problem.reference_steps and kept["rollbacks"] == 0
    assert kept["events"][0]["unanimous"] and kept["events"][0]["worst"] is None
    pairs = build_pairs([kept], _FakeTok())
    assert [p["step_index"] for p in pairs] == list(range(1, len(problem.reference_steps)))
    assert pair_stats([kept], pairs)["kept_steps_without_pair"] == 1


def test_truth_judge_keeps_right_steps_and_rolls_back_where_none_is_right(problem):
    """The oracle arm: the task's step check judges; a step with no right candidate is a tie, a step
    whose candidates are all right is kept without a pair (not rolled back)."""
    assert truth_comparison([False, True, None, True]).scores == [0, 2, 0, 2]
    assert truth_comparison([False, None]).order_scores == {"0,1": 0.5, "1,0": 0.5}
    attempts = {"n": 0}
    base = _reference_script(problem)

    def script(question, path):
        if len(path) == 1 and attempts["n"] == 0:  # first visit of step 2: only wrong candidates
            attempts["n"] += 1
            return ["Step 2: 2 + 2 = 5.", "Step 2: 1 + 1 = 3.", "Step 2: 2 + 2 = 5.", "Step 2: 0 + 1 = 7."]
        if len(path) == 0:  # step 1: every candidate right
            return [problem.reference_steps[0]] * 4
        return base(question, path)

    cfg = SearchConfig(width=4, judge=JudgeConfig(mode="truth"))
    trace = search_chunk([problem], ArithmeticTask(), scripted_proposer(script), None, cfg)[0]
    assert trace["path"] == problem.reference_steps and trace["final_correct"] and trace["rollbacks"] == 1
    assert [e["step_index"] for e in trace["events"] if e["tie"]] == [1]
    pairs = build_pairs([trace], _FakeTok())
    assert [p["step_index"] for p in pairs] == list(range(1, len(problem.reference_steps)))
    assert all(p["chosen_correct"] is True and p["rejected_correct"] is False for p in pairs)


def test_truth_judge_is_refused_for_a_task_without_step_truth(tmp_path):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    cfg = SearchConfig(model="tiny-random", task=TaskConfig(name="gsm8k", data=str(data)),
                       judge=JudgeConfig(mode="truth"), out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="judge.mode 'truth'.*'gsm8k'"):
        run_search(cfg, progress=False)


class _FakeTok:
    """Just enough tokenizer for build_pairs: a chat template and token counts."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>\n"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_pair_filters():
    trace = {"method": "psr", "question": "q", "problem_id": "p", "events": [
        {"kept": True, "step_index": 0, "previous_steps": [], "candidates": ["Step 1: a", "Step 1: a "],
         "best": 0, "worst": 1, "scores": [1, 0], "candidate_correct": [None, None]},
        {"kept": True, "step_index": 0, "previous_steps": [], "candidates": ["Step 1: a", "Step 1: b " * 50],
         "best": 0, "worst": 1, "scores": [1, 0], "candidate_correct": [None, None]},
        {"kept": True, "step_index": 0, "previous_steps": [], "candidates": ["Step 1: a", "Step 1: c"],
         "best": 0, "worst": 1, "scores": [3, 2], "candidate_correct": [None, None]},
        # the model stopped at once
        {"kept": True, "step_index": 0, "previous_steps": [], "candidates": ["Step 1: a", "  "],
         "best": 0, "worst": 1, "scores": [1, 0], "candidate_correct": [None, None]},
    ]}
    kept = build_pairs([trace], _FakeTok(), PairsConfig(max_step_tokens=20))
    assert [p["rejected"] for p in kept] == ["Step 1: c"]  # identical, over-long and empty pairs dropped
    events = [{**e, "order_disagreements": 0} for e in trace["events"]]
    stats = pair_stats([{**trace, "events": events, "status": "solved", "final_correct": False}], kept)
    assert stats["kept_steps_without_pair"] == 3  # reported, not silently lost
    with pytest.raises(ValueError, match="share of the score range"):
        build_pairs([trace], _FakeTok(), PairsConfig(min_margin=2))


def test_min_margin_means_the_same_share_of_the_score_range_for_psr_and_srlm():
    """PSR scores are win counts out of width - 1, SRLM scores expected rubric points out of 5: the
    margin is a share of that range for both (it was 1 win for PSR but a full rubric point for SRLM)."""
    def psr(scores):
        return {"method": "psr", "question": "q", "problem_id": "p", "events": [
            {"kept": True, "step_index": 0, "previous_steps": [], "candidates": [f"Step 1: {k}" for k in range(4)],
             "best": 0, "worst": 3, "scores": scores, "candidate_correct": [None] * 4}]}

    def srlm(scores):
        return {"method": "srlm", "question": "q", "problem_id": "p",
                "samples": [f"Step 1: {k}" for k in range(len(scores))],
                "scores": scores, "sample_correct": [None] * len(scores)}

    cfg = PairsConfig(min_margin=0.3)
    assert len(build_pairs([psr([2, 2, 1, 1])], _FakeTok(), cfg)) == 1  # 1 win of 3 = 0.33
    assert build_pairs([srlm([3.0, 2.0])], _FakeTok(), cfg) == []  # 1 point of 5 = 0.2
    assert len(build_pairs([srlm([3.6, 2.0])], _FakeTok(), cfg)) == 1  # 1.6 of 5 = 0.32
    row = build_pairs([srlm([4.0, 2.5])], _FakeTok())[0]  # default 0.1: half a point is enough
    assert row["margin_share"] == 0.3 and row["chosen"] == "Step 1: 0"


def test_unparseable_srlm_replies_stay_out_of_pairs_and_are_counted():
    """A reply without "Score: N" has no score: it was scored 0 and became every pair's "worst" solution."""
    trace = {"method": "srlm", "question": "q", "problem_id": "p", "status": "sampled", "final_correct": False,
             "samples": ["Step 1: a", "Step 1: b", "Step 1: c", "Step 1: d"], "scores": [None, 3.0, 1.0, None],
             "sample_correct": [False, True, False, False], "unparseable": 2, "events": []}
    pairs = build_pairs([trace], _FakeTok())
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Step 1: b", "Step 1: c")]
    assert build_pairs([{**trace, "scores": [None, 3.0, None, None]}], _FakeTok()) == []
    assert pair_stats([trace], pairs)["unparseable_verdicts"] == 2


def test_srlm_generate_mode_scores_unparseable_replies_as_none(tiny):
    from psr.srlm import RubricJudge

    model, tok = tiny
    scores, unparseable = RubricJudge(model, tok, mode="generate", max_new_tokens=4).score([("q", "Step 1: 1.")] * 2)
    assert unparseable == sum(s is None for s in scores) and all(s is None or 0 <= s <= 5 for s in scores)


def test_unverifiable_candidates_do_not_crash_the_search_stats(problem):
    """The demo's M1 writes prose steps the task cannot check (candidate_correct None): pair_stats crashed
    summing None. They count as not right; the share of such candidates is reported."""
    from psr.pairs import judge_in_search

    prose = "Step 1: Determine the initial position of the bus:"
    right = problem.reference_steps

    def script(question, path):
        k = len(path)
        return [f"Step {k + 1}: Let us think about it:", prose if k == 0 else f"Step {k + 1}: hmm", right[k]]

    rank = lambda c: 2 if c in right else (1 if c == prose else 0)  # noqa: E731 -- the judge keeps prose at step 1
    trace = search_chunk([problem], ArithmeticTask(), scripted_proposer(script), ScriptedJudge(rank),
                         SearchConfig(width=3))[0]
    assert trace["events"][0]["candidate_correct"] == [None, None, True]
    stats = pair_stats([trace], build_pairs([trace], _FakeTok()))
    j = stats["judge_in_search"]
    assert j["mixed_steps"] == len(trace["events"]) and j["kept_right_when_mixed"] == 1.0
    assert j["unverifiable_candidates"] > 0.5
    # The demo's crash: a kept candidate that cannot be checked.
    crash = [{"events": [{"candidate_correct": [None, True, None], "best": 2},
                         {"candidate_correct": [None, True, None], "best": 1}]}]
    assert judge_in_search(crash)["kept_right_when_mixed"] == 0.5


def test_giving_up_keeps_the_steps_found_so_far_and_their_pairs(problem):
    """When the tie rule gives a problem up, the last tie must not also roll back a kept step and its pair."""
    right = problem.reference_steps

    def script(question, path):
        if not path:
            return [right[0], "Step 1: 1 + 1 = 3."]
        return ["Step 2: same", "Step 2: same"]  # ties forever

    judge = ScriptedJudge(lambda c: 1 if c == right[0] else 0)
    trace = search_chunk([problem], ArithmeticTask(), scripted_proposer(script), judge,
                         SearchConfig(width=2, max_rollbacks=0))[0]
    assert trace["status"] == "gave_up" and trace["path"] == [right[0]]
    assert len(build_pairs([trace], _FakeTok())) == 1


def test_a_blank_line_before_the_step_marker_is_not_an_empty_step(tiny):
    """SmolLM2 sometimes opens a step with a newline: '\nStep 2: ...' was cut to '' (every candidate empty)."""
    import torch

    from psr.generation import StepBoundaryStopping, cut_at_step_boundary

    assert cut_at_step_boundary("\nStep 2: 3 + 4 = 7.\nStep 3: 7 * 2 = 14.") == "Step 2: 3 + 4 = 7."
    assert cut_at_step_boundary("\n\n  Step 2: 3 + 4 = 7.") == "Step 2: 3 + 4 = 7."
    # steps run together on one line (seen in the smoke run's M1) are two steps
    assert cut_at_step_boundary("Step 1: Add 1 to it. Step 2: Add 3 to it.") == "Step 1: Add 1 to it."
    _, tok = tiny
    prompt = tok("Question?", add_special_tokens=False)["input_ids"]

    def done(text):  # a fresh criterion per text: it keeps each row's scan state across decode steps
        ids = torch.tensor([prompt + tok(text, add_special_tokens=False)["input_ids"]])
        return bool(StepBoundaryStopping(tok, len(prompt))(ids, None)[0])

    assert not done("\nStep 2: 3 + 4")  # the step has only begun
    assert done("\nStep 2: 3 + 4 = 7.\nStep 3:")


def test_judge_in_search_scores_every_judged_step_ties_included_against_random():
    from psr.pairs import judge_in_search

    def event(correct, best):
        return {"candidate_correct": correct, "best": best}

    traces = [{"events": [event([True, False, False, False], 0),  # mixed, kept right (random 1/4)
                          event([True, True, False, False], 2),   # mixed, kept wrong (random 1/2)
                          event([False, False, False, False], 1),  # no right candidate
                          event([True, True, True, True], 3),  # all right
                          event([False, False, False, False], None),  # none right, tie: rolled back
                          event([True, False, False, False], None)]},  # mixed, tie: nothing kept
              {"events": [{"candidate_correct": None, "best": None}]}]  # no truth: not counted
    assert judge_in_search(traces) == {"steps": 6, "no_right_candidate": 0.3333, "unverifiable_candidates": 0.0,
                                       "ties": 0.3333, "mixed_steps": 3,
                                       "kept_right_when_mixed": 0.3333, "random_right_when_mixed": 0.3333}
    assert judge_in_search([{"events": []}]) is None


def test_ending_pairs_count_which_way_the_judge_leans_between_answering_and_going_on():
    from psr.pairs import ending_pairs

    answer, go_on = "Step 3: 4 + 5 = 9. The answer is \\boxed{9}.", "Step 3: 4 + 5 = 9."
    pairs = [{"kind": "step", "chosen": go_on, "rejected": answer},
             {"kind": "step", "chosen": go_on, "rejected": answer},
             {"kind": "step", "chosen": answer, "rejected": go_on},
             {"kind": "step", "chosen": go_on, "rejected": "Step 3: 4 + 5 = 10."},  # neither answers
             {"kind": "solution", "chosen": go_on, "rejected": answer}]  # SRLM rows are whole solutions
    assert ending_pairs(pairs) == {"step_pairs": 4, "chosen_goes_on_rejected_answers": 2,
                                   "chosen_answers_rejected_goes_on": 1}
    assert ending_pairs(pairs[-1:]) is None


def test_parse_verdict():
    assert parse_verdict(judge_reply("A", "Step A is right.")) == "A"
    assert parse_verdict("blah [[ B ]]") == "B"
    assert parse_verdict("I cannot decide") is None
    assert parse_verdict("either [[A]] or [[B]] maybe") is None
    with pytest.raises(ValueError):
        judge_reply("C")


def test_logits_judge_prefix_reuse_matches_plain(tiny):
    import torch

    model, tok = tiny
    cands = ["Step 2: 10 + 11 = 21.", "Step 2: 10 - 11 = 1.", "Step 2: 10 * 11 = 110.", "Step 2: hmm"]
    items = [("A bus carries 15 passengers. 5 get off, 11 get on. How many now?", ["Step 1: 15 - 5 = 10."], cands)]
    reuse = StepJudge(model, tok, JudgeConfig(prefix_reuse=True, batch_size=5)).compare(items)[0]
    plain = StepJudge(model, tok, JudgeConfig(prefix_reuse=False)).compare(items)[0]
    assert len(reuse.order_scores) == 12  # every ordered pair: both orders of each of the 6 pairs
    a = torch.tensor(list(reuse.order_scores.values()))
    b = torch.tensor(list(plain.order_scores.values()))
    assert torch.allclose(a, b, atol=2e-4)
    summed = StepJudge(model, tok, JudgeConfig(aggregation="sum", tie_margin=0.0)).compare(items)[0]
    assert all(summed.wins[i][j] + summed.wins[j][i] == 1 for i in range(4) for j in range(4) if i != j)


def test_logits_judge_scores_bf16_models_in_float32(tiny):
    """A bf16 model's verdict scores come from float32 letter logits, not bf16-rounded ones (which tied on GPUs)."""
    import copy

    import torch

    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    candidates = ["Step 1: 5 - 2 = 3.", "Step 1: 5 + 2 = 7.", "Step 1: hmm"]
    items = [("Tom has 5 apples and eats 2. How many?", [], candidates)]
    judge = StepJudge(bf16, tok, JudgeConfig(prefix_reuse=False, batch_size=1))  # no padding: same as below
    scores = judge.compare(items)[0].order_scores
    prompts = [judge.prompt(items[0][0], [], items[0][2][int(k[0])], items[0][2][int(k[2])], True) for k in scores]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
            hidden = bf16.get_decoder()(**ids).last_hidden_state[0, -1].double()
            logits = bf16.get_output_embeddings().weight[judge.choice_ids].double() @ hidden
            expected.append(torch.softmax(logits, dim=-1)[0].item())
    assert torch.allclose(torch.tensor(list(scores.values()), dtype=torch.float64),
                          torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_generate_judge_counts_unparseable_without_crashing(tiny):
    model, tok = tiny
    comp = StepJudge(model, tok, JudgeConfig(mode="generate", max_new_tokens=6)).compare(
        [("What is 1 + 1?", [], ["Step 1: 1 + 1 = 2.", "Step 1: 1 + 1 = 3."])])[0]
    assert comp.unparseable + sum(v is not None for v in comp.order_scores.values()) == 2
    assert len(comp.replies) == 2 and sum(map(sum, comp.wins)) <= 1


def _tiny_search_cfg(out, **kw):
    cfg = dict(model="tiny-random", limit=4, chunk_size=2, width=3, max_steps=3, max_step_tokens=12,
               judge={"aggregation": "sum", "tie_margin": 0.0}, out=str(out), seed=7)  # tiny-random judges at chance
    cfg.update(kw)
    from psr.config import from_dict

    return from_dict(SearchConfig, cfg)


def test_search_end_to_end_on_tiny_random_and_resume(tmp_path, tiny):
    from datasets import load_dataset

    model, tok = tiny
    cfg = _tiny_search_cfg(tmp_path / "run")
    stats = run_search(cfg, model, tok, progress=False)
    traces = [json.loads(line) for line in (tmp_path / "run" / "search.jsonl").open()]
    assert [t["problem_id"] for t in traces] == [f"arith-train-7-{i:05d}" for i in range(4)]
    for t in traces:
        assert t["status"] in ("answered", "max_steps", "gave_up", "empty_step")
        for e in t["events"]:
            assert len(e["candidates"]) == 3 and len(e["judgments"]) == 6 and len(e["scores"]) == 3
            assert all("\nStep" not in c for c in e["candidates"])
    ds = load_dataset("json", data_files=str(tmp_path / "run" / "pairs.jsonl"), split="train")
    assert len(ds) == stats["pairs"] > 0
    assert {"prompt", "chosen", "rejected", "problem_id", "step_index", "margin", "round"} <= set(ds.column_names)
    assert all(p.endswith("\n") for p in ds["prompt"])

    # Resume: a lost chunk is redone with its own seed, finished chunks are not touched.
    chunk_dir = tmp_path / "run" / "search_chunks"
    kept_mtime = (chunk_dir / "00000.jsonl").stat().st_mtime_ns
    first = (tmp_path / "run" / "search.jsonl").read_text()
    (chunk_dir / "00001.jsonl").unlink()
    run_search(cfg, model, tok, progress=False)
    assert (chunk_dir / "00000.jsonl").stat().st_mtime_ns == kept_mtime
    assert (tmp_path / "run" / "search.jsonl").read_text() == first


def test_srlm_baseline_on_tiny_random(tmp_path, tiny):
    model, tok = tiny
    cfg = _tiny_search_cfg(tmp_path / "srlm", method="srlm", srlm={"samples": 3, "max_new_tokens": 16})
    stats = run_search(cfg, model, tok, progress=False)
    traces = [json.loads(line) for line in (tmp_path / "srlm" / "search.jsonl").open()]
    # a sample with a final answer is scored 0-5; one without (tiny-random never answers) is counted, not scored
    assert all(len(t["samples"]) == 3 and len(t["scores"]) == 3 and len(t["sample_answered"]) == 3 for t in traces)
    assert all((s is not None and 0 <= s <= 5) == a for t in traces for s, a in zip(t["scores"], t["sample_answered"]))
    assert stats["unanswered_samples"] == sum(not a for t in traces for a in t["sample_answered"])
    pairs = [json.loads(line) for line in (tmp_path / "srlm" / "pairs.jsonl").open()]
    assert len(pairs) == stats["pairs"]
    assert all(p["kind"] == "solution" and p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_srlm_never_pairs_a_sample_without_a_final_answer(tiny):
    """Scripted samples: the best-scored one was cut off at max_new_tokens; it must not become 'chosen' (a
    cut-off text as a pair teaches the model to stop there), and it is never 'rejected' either."""
    from psr.pairs import build_pairs

    _, tok = tiny
    samples = ["Step 1: 3 + 4 = 7\nStep 2: 7 * 2 =", "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14 \\boxed{14}",
               "Step 1: 3 + 4 = 8\nStep 2: 8 * 2 = 16 \\boxed{16}", "Step 1: 3 * 4 ="]
    trace = {"problem_id": "p", "question": "q?", "method": "srlm", "samples": samples, "scores": [5.0, 4.0, 1.0, 0.0],
             "sample_answered": [False, True, True, False], "sample_correct": [False, True, False, False]}
    pairs = build_pairs([trace], tok)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(samples[1], samples[2])]


def test_pairs_are_accepted_by_trl_dpo_trainer(tmp_path, tiny):
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = tiny
    cfg = _tiny_search_cfg(tmp_path / "run", limit=2)
    run_search(cfg, model, tok, progress=False)
    ds = load_dataset("json", data_files=str(tmp_path / "run" / "pairs.jsonl"), split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                     bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no")
    import copy

    trainer = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args, train_dataset=ds,
                         processing_class=tok)
    out = trainer.train()
    assert out.global_step == 1


def test_two_process_search_equals_single_process(tmp_path):
    """accelerate launch with 2 CPU processes: chunks are sharded, rank 0 merges; same output as 1 process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["search", "--model", "tiny-random", "--limit", "6", "--width", "3", "--seed", "3", "--config",
            str(tmp_path / "c.yaml")]
    # lockstep: chunks dealt round-robin, so rank 1 surely searches (the in-flight driver's ranks claim chunks as
    # they go; tests/test_cluster.py compares its two-rank result with one rank's)
    (tmp_path / "c.yaml").write_text("driver: lockstep\nchunk_size: 2\nmax_steps: 2\nmax_step_tokens: 10\n"
                                     "judge:\n  aggregation: sum\n  tie_margin: 0.0\n")
    single = subprocess.run([sys.executable, "-m", "psr.cli", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "psr.cli"]
    multi = subprocess.run([*launcher, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                           text=True, cwd=ROOT)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert (tmp_path / "two" / "search_chunks" / "timing.rank1.json").exists()  # rank 1 really searched
    assert (tmp_path / "one" / "search.jsonl").read_text() == (tmp_path / "two" / "search.jsonl").read_text()
    assert (tmp_path / "one" / "pairs.jsonl").read_text() == (tmp_path / "two" / "pairs.jsonl").read_text()


def test_judge_eval_on_builtin_and_labelled_pairs(tmp_path, capsys):
    from psr.cli import main
    from psr.judge_eval import heldout_step_pairs

    pairs = heldout_step_pairs(ArithmeticTask(), 8)
    task = ArithmeticTask()
    by_id = {p.id: p for p in task.problems("test", 8)}
    for r in pairs:  # held-out pairs: right step vs a surely wrong one, all corruption kinds
        p = by_id[r["problem_id"]]
        assert task.check_step(p, r["previous_steps"], r["chosen"]) is True
        assert task.check_step(p, r["previous_steps"], r["rejected"]) is False
    assert {r["kind"] for r in pairs} == set(CORRUPTIONS)

    out = tmp_path / "j.json"
    assert main(["judge-eval", "--model", "tiny-random", "--limit", "8", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == 8 and 0 <= r["accuracy"] <= r["per_order_accuracy"] + 0.5 and 0 <= r["position_bias_share_A"] <= 1
    # both aggregations recomputed from the stored per-order P(A): agree = both orders right,
    # sum = P(A|right first) > P(A|right second)
    verdicts = [p["verdicts"] for p in r["pairs"]]
    assert r["accuracy_by_aggregation"]["agree"] == sum(a > 0.5 > b for a, b in verdicts) / 8 == r["accuracy"]
    assert r["accuracy_by_aggregation"]["sum"] == sum(a > b for a, b in verdicts) / 8
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"question": x["question"], "previous_steps": x["previous_steps"],
                                            "chosen": x["chosen"], "rejected": x["rejected"]}) + "\n" for x in pairs))
    assert main(["judge-eval", "--model", "tiny-random", "--pairs", str(labelled), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 8
    labelled.write_text(json.dumps({"question": "q", "chosen": "a"}) + "\n")
    assert main(["judge-eval", "--model", "tiny-random", "--pairs", str(labelled)]) == 2
    assert "labelled.jsonl:1: missing field 'rejected'" in capsys.readouterr().err
