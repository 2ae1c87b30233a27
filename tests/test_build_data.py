"""IFT by step segmentation and EFT from the model's own search: annotation, filtering, balancing, bad rows."""

import json
import random

import pytest
from conftest import GSM8K, MATH500, needs_shared

from psr.build_eft import (
    BuildEFTConfig,
    annotate,
    eft_rows,
    ending,
    rollout_labels,
    run_build_eft,
    search_chunk,
    select_pairs,
)
from psr.build_ift import BuildIFTConfig, math_reference_steps, run_build_ift
from psr.config import ConfigError
from psr.files import read_jsonl
from psr.steps import STEP_MARKER_RE, has_final_answer
from psr.tasks import ArithmeticTask, DataError, TaskConfig


# ---- IFT ---------------------------------------------------------------------------------------
def test_math_solutions_become_steps_with_the_boxed_answer_last():
    solution = ("We have $x = 2$. So the value is $2 \\cdot 3 = 6$.\n\n[asy]\ndraw((0,0)--(1,1));\n[/asy]\n\n"
                "Thus $y = 6$, since y equals the value.\n\nTherefore the answer is $\\boxed{6}$.The answer is: 6")
    steps = math_reference_steps(solution)
    assert all(STEP_MARKER_RE.match(s) for s in steps)
    assert [s.split(":")[0] for s in steps] == [f"Step {i}" for i in range(1, 4)]
    assert has_final_answer(steps[-1]) and "asy" not in " ".join(steps) and "The answer is: 6" not in steps[-1]
    # a short fragment joins the step before
    assert len(math_reference_steps("It is $\\frac{1}{2}$ of 4, so it is 2.\n\nSo \\boxed{2}.")) == 1


def test_build_ift_counts_what_it_skips(tmp_path):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
            {"question": "", "answer": "#### 1"},
            {"question": "No gold?", "answer": "It is 4."},
            {"question": "Long?", "answer": "\n".join(f"{i} + 1 = {i + 1}" for i in range(30)) + "\n#### 30"},
            {"question": "Numeric?", "answer": 42}, {"answer": "#### 3"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), out=str(tmp_path / "ift.jsonl"))
    stats = run_build_ift(cfg)
    # as precise as eval: the line, and a number is a wrong type, not a missing field
    assert stats["rows"] == 1 and stats["skipped"] == {
        "field 'question' is empty": 1, "no '#### <answer>' line": 1, "more than 20 steps": 1,
        "field 'answer' must be a string, got int": 1, "missing field 'question'": 1}
    assert stats["skipped_lines"]["field 'answer' must be a string, got int"] == [5]
    assert stats["skipped_lines"]["no '#### <answer>' line"] == [3]
    with pytest.raises(DataError, match=r"no problems: offset 6 is past the end of .*gsm.jsonl \(6 rows\)"):
        run_build_ift(BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), offset=6, out=cfg.out))
    with pytest.raises(DataError, match=r"from offset 4: every row was skipped \(1 field 'answer' must be a string, "
                                        r"got int \(.*gsm.jsonl:5\); 1 missing field 'question' \(.*gsm.jsonl:6\)\)"):
        run_build_ift(BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), offset=4, out=cfg.out))
    (row,) = read_jsonl(tmp_path / "ift.jsonl")
    assert row["steps"] == ["Step 1: 3 + 2 = 5 The answer is \\boxed{5}."] and row["answer"] == "5"
    data.write_text(json.dumps(rows[0]) + "\nnot json\n")
    with pytest.raises(DataError, match="gsm.jsonl:2: not valid JSON"):
        run_build_ift(BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), out=str(tmp_path / "x.jsonl")))


@needs_shared
def test_build_ift_on_real_gsm8k_and_math_rows_feeds_init(tmp_path, tiny):
    from psr.train.sft import read_ift_file

    _, tok = tiny
    for name, data in (("gsm8k", GSM8K), ("math", MATH500)):
        out = tmp_path / f"{name}.jsonl"
        stats = run_build_ift(BuildIFTConfig(task=TaskConfig(name=name, data=str(data)), limit=20, out=str(out)))
        assert stats["rows"] == 20 and 1 < stats["mean_steps"] < 20
        rows = read_ift_file(str(out), tok)  # init reads what build-ift writes
        assert len(rows) == 20 and all(has_final_answer(r["completion"].strip().splitlines()[-1]) for r in rows)


# ---- EFT ---------------------------------------------------------------------------------------
@pytest.fixture
def problem():
    return ArithmeticTask(min_steps=3, max_steps=3).problems("train", 1)[0]


def _script(problem, wrong_at_first=False):
    """Candidates: the reference step, two wrong ones, and a prose step the task cannot check."""
    ref = problem.reference_steps

    def propose(items, k):
        out = []
        for _, prefix in items:
            n = len(prefix)
            right = ref[n]
            cands = [f"Step {n + 1}: 1 + 1 = 3.", f"Step {n + 1}: Let me think.", f"Step {n + 1}: 2 * 2 = 5.", right]
            if wrong_at_first and n == 0:
                cands[3] = f"Step {n + 1}: 9 - 1 = 7."
            out.append(cands[:k])
        return out

    return propose


def test_eft_search_extends_along_right_steps_and_falls_back_to_the_reference(problem):
    task = ArithmeticTask(min_steps=3, max_steps=3)
    cfg = BuildEFTConfig(width=4, annotator="exact")
    steps = search_chunk([problem], _script(problem, wrong_at_first=True), annotate(task, cfg), cfg, random.Random(0))
    assert [s["step_index"] for s in steps] == [0, 1, 2]
    assert steps[0]["labels"] == [False, None, False, False] and steps[0]["pairs"] == []  # no right candidate ...
    assert steps[1]["previous_steps"] == problem.reference_steps[:1]  # ... so the reference step carries on
    assert steps[2]["labels"] == [False, None, False, True] and sorted(steps[2]["pairs"]) == [(3, 0), (3, 2)]


def test_pairs_are_right_vs_wrong_balanced_and_in_both_orders(problem):
    task = ArithmeticTask(min_steps=3, max_steps=3)
    cfg = BuildEFTConfig(width=4, pairs_per_step=1)
    steps = search_chunk([problem] * 5, _script(problem), annotate(task, cfg), cfg, random.Random(0))
    pairs = select_pairs(steps, cfg, random.Random(0))
    assert len(pairs) == 15  # one per step, 3 steps x 5 problems
    for p in pairs:
        assert task.check_step(problem, p["previous_steps"], p["right"]) is True
        assert task.check_step(problem, p["previous_steps"], p["wrong"]) is False  # never the unverifiable prose
    capped = select_pairs(steps, BuildEFTConfig(width=4, pairs_per_step=1, max_pairs=6), random.Random(0))
    by_group = {}
    for p in capped:  # round-robin over (step index, ending): no group takes more than its share
        key = (p["step_index"], ending(p["right"], p["wrong"]))
        by_group[key] = by_group.get(key, 0) + 1
    assert len(capped) == 6 and max(by_group.values()) - min(by_group.values()) <= 1 and len(by_group) == 3
    rows = eft_rows(capped, cfg, random.Random(0))
    assert len(rows) == 12 and [r["verdict"] for r in rows[:4]] == ["A", "B", "A", "B"]
    assert rows[0]["step_a"] == rows[1]["step_b"] and rows[0]["step_b"] == rows[1]["step_a"]  # adjacent orders
    two = select_pairs(steps, BuildEFTConfig(width=4, pairs_per_step=2), random.Random(0))
    assert len(two) == 30 and len({(p["problem_id"], p["step_index"], p["wrong"]) for p in two[:2]}) == 2


def test_recompute_justifications_back_the_verdict_in_both_orders(problem):
    """``justification_kind: recompute``: each row's justification recomputes both candidates, and the line of
    the verdict's letter is the one that says right."""
    task = ArithmeticTask(min_steps=3, max_steps=3)
    cfg = BuildEFTConfig(width=4, pairs_per_step=1, justification=True, justification_kind="recompute")
    steps = search_chunk([problem], _script(problem), annotate(task, cfg), cfg, random.Random(0))
    rows = eft_rows(select_pairs(steps, cfg, random.Random(0)), cfg, random.Random(0), task, {problem.id: problem})
    assert len(rows) == 6
    for row in rows:
        lines = row["justification"].split("\n")
        a, op, b, r = problem.meta["chain"][row["step_index"]]
        assert lines[0].startswith(f"Next step: {a} {op} {b} = {r}")
        verdict_line = lines[1] if row["verdict"] == "A" else lines[2]
        other_line = lines[2] if row["verdict"] == "A" else lines[1]
        assert verdict_line.endswith("right.") and ", wrong" in other_line


def test_recompute_justifications_need_a_task_that_recomputes(tmp_path):
    cfg = BuildEFTConfig(task=TaskConfig(name="gsm8k", data=str(tmp_path / "g.jsonl")), annotator="rollout",
                         justification=True, justification_kind="recompute", out=str(tmp_path / "eft.jsonl"))
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"}) + "\n")
    with pytest.raises(ConfigError, match="recompute"):
        run_build_eft(cfg)


def test_rollout_annotator_estimates_from_completions_that_reach_the_gold(problem):
    """Math-Shepherd's estimate with scripted completions: 3/4 reach the gold -> right; 0/4 -> wrong;
    1/4 -> unsure (below the threshold, not used); a boxed step is checked directly."""
    ref, gold = problem.reference_steps, problem.gold
    finish = "\n".join(ref[1:])
    good_end, bad_end = finish, finish.replace(f"\\boxed{{{gold}}}", "\\boxed{-1}")
    seen = []

    def complete(items, k):
        seen.extend(items)
        out = []
        for _, steps in items:
            last = steps[-1]
            n_good = 3 if last == ref[0] else (1 if "7 + 7" in last else 0)
            out.append([good_end] * n_good + [bad_end] * (k - n_good))
        return out

    cands = [[ref[0], "Step 1: 7 + 7 = 14.", "Step 1: 1 + 1 = 3.", f"Step 1: The answer is \\boxed{{{gold}}}."]]
    labels, shares = rollout_labels(ArithmeticTask(), complete, [problem], [[]], cands, BuildEFTConfig(rollouts=4))
    assert shares == [[0.75, 0.25, 0.0, 1.0]] and labels == [[True, None, False, True]]
    assert [steps for _, steps in seen] == [[c] for c in cands[0][:3]]  # rollouts start after prefix + step


def test_build_eft_end_to_end_on_tiny_random_resumes_and_feeds_init(tmp_path, tiny):
    from psr.train.sft import read_eft_file

    model, tok = tiny
    out = tmp_path / "eft.jsonl"
    cfg = BuildEFTConfig(model="tiny-random", task=TaskConfig(name="arithmetic", min_steps=2, max_steps=2), limit=4,
                         width=3, max_steps=3, max_step_tokens=8, chunk_size=2, out=str(out))
    stats = run_build_eft(cfg, model, tok, progress=False)
    assert stats["problems"] == 4 and stats["steps"] >= 4 and stats["candidates"] == 3 * stats["steps"]
    first = (tmp_path / "eft.jsonl.steps.jsonl").read_text()
    (tmp_path / "eft.jsonl.chunks" / "00001.jsonl").unlink()  # a killed build redoes only the lost chunk, the same way
    run_build_eft(cfg, model, tok, progress=False)
    assert (tmp_path / "eft.jsonl.steps.jsonl").read_text() == first
    if stats["rows"]:
        assert len(read_eft_file(str(out), tok)) == stats["rows"]
    rollout = BuildEFTConfig(**{**cfg.__dict__, "annotator": "rollout", "rollouts": 2, "rollout_max_new_tokens": 8,
                                "out": str(tmp_path / "r.jsonl"), "limit": 2})
    assert run_build_eft(rollout, model, tok, progress=False)["steps"] >= 2
    with pytest.raises(ConfigError, match="annotator 'exact'"):
        run_build_eft(BuildEFTConfig(task=TaskConfig(name="gsm8k", data=str(tmp_path / "eft.jsonl")), out=str(out)))
    with pytest.raises(ValueError, match="annotator_model"):
        BuildEFTConfig(annotator="model")


def test_init_with_eft_from_search_trains_the_ift_pass_then_builds_eft_then_m1(tmp_path, capsys):
    """eft_source: search runs the whole chain inside init: IFT pass -> build-eft with its candidates ->
    M1 on IFT + the built EFT rows; a second run finds every part done and only retrains M1."""
    from psr.config import from_dict, to_dict
    from psr.files import read_json
    from psr.train.sft import InitConfig, run_init

    cfg = from_dict(InitConfig, {
        "model": "tiny-random", "out": str(tmp_path / "init" / "model"), "ift_examples": 4, "max_steps": 1,
        "batch_size": 2, "learning_rate": 1e-3, "report_to": [], "progress": False, "eft_source": "search",
        "task": {"name": "arithmetic", "min_steps": 2, "max_steps": 2},
        "eft_search": {"limit": 2, "width": 2, "max_steps": 2, "max_step_tokens": 6}})
    log = run_init(cfg)
    assert (tmp_path / "init" / "ift_pass" / "train_log.json").exists()
    assert (tmp_path / "init" / "eft_search" / "eft.jsonl.stats.json").exists()
    assert log["eft_search"]["problems"] == 2 and log["examples"]["ift"] == 4
    assert log["examples"]["eft"] == log["eft_search"]["rows"]
    if not log["eft_search"]["rows"]:  # tiny-random writes no right step: said, not silent
        assert "no right-vs-wrong pair" in capsys.readouterr().err
    mtime = (tmp_path / "init" / "ift_pass" / "model.safetensors").stat().st_mtime_ns
    run_init(cfg)
    assert (tmp_path / "init" / "ift_pass" / "model.safetensors").stat().st_mtime_ns == mtime
    # a setting that shapes only the EFT rows (a judge that reasons) keeps the IFT pass and its search
    capsys.readouterr()
    run_init(from_dict(InitConfig, {**to_dict(cfg), "eft_justification": True,
                                    "eft_search": {**to_dict(cfg.eft_search), "justification": True,
                                                   "justification_kind": "recompute"}}))
    assert (tmp_path / "init" / "ift_pass" / "model.safetensors").stat().st_mtime_ns == mtime
    assert "made by another config" not in capsys.readouterr().err
    # the EFT search's problems come after the IFT problems of the same stream: none is an IFT problem
    ift_ids = {r["problem_id"] for r in read_jsonl(tmp_path / "init" / "model" / "ift.jsonl")}
    eft_ids = {s["problem_id"] for s in read_jsonl(tmp_path / "init" / "eft_search" / "eft.jsonl.steps.jsonl")}
    assert len(ift_ids) == 4 and len(eft_ids) == 2 and not ift_ids & eft_ids
    # a changed init setting: the IFT pass is trained again and build-eft searches with the new one (the old
    # init reused both and reported the new config)
    capsys.readouterr()
    run_init(from_dict(InitConfig, {**to_dict(cfg), "learning_rate": 2e-3}))
    err = capsys.readouterr().err
    assert "ift_pass was made by another config or model; training the IFT pass again" in err
    assert "made by another config or model (the model); starting over" in err
    log = read_json(tmp_path / "init" / "ift_pass" / "train_log.json")
    assert log["config"]["learning_rate"] == 2e-3
    with pytest.raises(ConfigError, match="init_from: ift_pass needs eft_source: search"):
        from_dict(InitConfig, {"init_from": "ift_pass"})


def test_rollouts_are_graded_at_their_first_answer(problem):
    """A scripted rollout boxes a wrong answer, then a right one: the step it follows reaches nothing (the
    old grader read the last \\boxed{} of solution + rollout and labelled a wrong step right). A rollout
    that never answers reaches nothing either."""
    gold = problem.gold
    wrong_then_right = f"Step 2: so \\boxed{{{int(gold) + 1}}}\nStep 3: no wait, \\boxed{{{gold}}}"
    no_answer = "Step 2: then we add the rest and get"

    def complete(items, k):
        return [[wrong_then_right, no_answer][:k] for _ in items]

    cands = [["Step 1: 1 + 1 = 3.", "Step 1: 2 + 2 = 4."]]
    labels, shares = rollout_labels(ArithmeticTask(), complete, [problem], [[]], cands, BuildEFTConfig(rollouts=2))
    assert shares == [[0.0, 0.0]] and labels == [[False, False]]


def test_rollouts_stop_at_their_answer_line(tiny):
    """build-eft's completer asks the engine to stop each rollout at its answer line (as evaluation does)."""
    from psr.build_eft import model_completer
    from psr.sampling import SamplingConfig

    model, tok = tiny
    calls = []

    class Recorder:  # a vLLM-engine-shaped recorder of what generate is asked (the arguments, not a result)
        is_vllm_engine = True
        max_len = 4096

        def generate(self, prompts, sampling, max_new_tokens, n, stop_at_step, stop_at_answer, *rest, **kw):
            calls.append((stop_at_step, stop_at_answer))
            return [["x"] * n for _ in prompts]

    cfg = BuildEFTConfig()
    model_completer(Recorder(), tok, cfg, SamplingConfig(), 8, stop_at_step=False)([("q", [])], 2)
    model_completer(Recorder(), tok, cfg, SamplingConfig(), 8, stop_at_step=True)([("q", [])], 2)
    assert calls == [(False, True), (True, False)]


def test_two_pairs_of_a_step_use_two_different_wrong_steps():
    """Two right and two wrong candidates: the two pairs kept must not share their wrong step (the old sort
    read a set that was still empty, so about a third of draws did)."""
    step = {"problem_id": "p", "question": "q", "gold": "1", "step_index": 0, "previous_steps": [],
            "candidates": ["Step 1: R1", "Step 1: R2", "Step 1: W1", "Step 1: W2"],
            "labels": [True, True, False, False],
            "rollout_shares": None, "pairs": [(0, 2), (0, 3), (1, 2), (1, 3)]}
    for seed in range(30):
        picked = select_pairs([step], BuildEFTConfig(pairs_per_step=2), random.Random(seed))
        assert len({p["wrong"] for p in picked}) == 2, seed


def test_build_ift_limit_is_a_range_of_rows_and_says_where_the_next_stage_starts(tmp_path):
    data = tmp_path / "gsm.jsonl"
    rows = [{"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    rows[1]["answer"] = "no gold"  # skipped, and still counted as read
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), offset=1, limit=3,
                         out=str(tmp_path / "i.jsonl"))
    stats = run_build_ift(cfg)
    assert stats["rows"] == 2 and stats["rows_read"] == [1, 4] and stats["next_offset"] == 4
    assert [r["question"] for r in read_jsonl(tmp_path / "i.jsonl")] == ["Q2?", "Q3?"]
    with pytest.raises(DataError, match="offset 6 is past the end"):
        run_build_ift(BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), offset=6, out=str(tmp_path / "j")))


def test_build_eft_reuses_chunks_only_from_the_same_config_and_model(tmp_path, tiny, capsys):
    """Run again into the same out with another width: every chunk is searched again (said in one line), and
    the saved steps hold candidates of the new width (the old build reused the width-2 chunks)."""
    model, tok = tiny
    cfg = BuildEFTConfig(model="tiny-random", task=TaskConfig(name="arithmetic", min_steps=2, max_steps=2), limit=2,
                         width=2, max_steps=2, max_step_tokens=6, chunk_size=1, out=str(tmp_path / "eft.jsonl"))
    run_build_eft(cfg, model, tok, progress=False)
    wider = BuildEFTConfig(**{**cfg.__dict__, "width": 3})
    run_build_eft(wider, model, tok, progress=False)
    assert "made by another config or model (width); starting over" in capsys.readouterr().err
    assert {len(s["candidates"]) for s in read_jsonl(tmp_path / "eft.jsonl.steps.jsonl")} == {3}
    # settings used only after the search (filtering) keep the chunks
    mtime = (tmp_path / "eft.jsonl.chunks" / "00000.jsonl").stat().st_mtime_ns
    run_build_eft(BuildEFTConfig(**{**wider.__dict__, "pairs_per_step": 1}), model, tok, progress=False)
    assert (tmp_path / "eft.jsonl.chunks" / "00000.jsonl").stat().st_mtime_ns == mtime
