"""Issue 30: the in-flight search driver (psr.inflight) against the lockstep one (search_chunk) on the tiny
model: with per-request seeds both give the same traces, whatever the units, the problems in flight or the
batch size; the oracle arm too; and run_search with it resumes and shards as before."""

import pytest

from psr.inflight import request_seed, search_inflight
from psr.search import SearchConfig, model_proposer, search_chunk
from psr.tasks import ArithmeticTask


def test_request_seeds_are_distinct_and_stable():
    seeds = {request_seed(0, f"p{p}", s, a, k) for p in range(5) for s in range(3) for a in range(3) for k in range(6)}
    assert len(seeds) == 5 * 3 * 3 * 6
    assert request_seed(0, "p1", 2, 3, 4) == request_seed(0, "p1", 2, 3, 4) != request_seed(1, "p1", 2, 3, 4)


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = tiny
    task = ArithmeticTask()
    return model, tok, task, task.problems("train", 5, seed=0)


@pytest.mark.parametrize("mode", ["logits", "truth", "likelihood", "likelihood-min"])
def test_inflight_traces_equal_lockstep(setup, mode):
    from psr.judge import JudgeConfig
    from psr.self_judges import make_judge

    model, tok, task, problems = setup
    likelihood = dict(mode="likelihood", tie_margin=0.0, likelihood_reduction=mode.removeprefix("likelihood-"))
    cfg = SearchConfig(model="tiny-random", width=3, max_steps=3, max_step_tokens=10, batch_size=6, max_rollbacks=1,
                       judge=JudgeConfig(**likelihood) if mode.startswith("likelihood") else JudgeConfig(mode=mode))
    judge = make_judge(model, tok, cfg.judge)
    lockstep = search_chunk(problems, task, model_proposer(model, tok, cfg), judge, cfg)
    inflight = search_inflight(problems, task, model, tok, judge, cfg, unit_size=2)
    assert inflight == lockstep
    assert all(len(t["events"]) >= 1 for t in inflight)
    # other batching: one problem per generate call, two problems in flight
    cfg2 = SearchConfig(model="tiny-random", width=3, max_steps=3, max_step_tokens=10, batch_size=3, max_rollbacks=1,
                        inflight=2)
    assert search_inflight(problems, task, model, tok, judge, cfg2, unit_size=1) == lockstep


def test_inflight_keeps_unanimous_steps_as_lockstep_does(setup):
    """Near-greedy candidates (top_p keeps one token) are all one text: with keep_unanimous both drivers keep it and
    go on, no rollback."""
    from psr.judge import JudgeConfig
    from psr.sampling import SamplingConfig
    from psr.self_judges import make_judge

    model, tok, task, problems = setup
    cfg = SearchConfig(model="tiny-random", width=3, max_steps=3, max_step_tokens=10, batch_size=6, max_rollbacks=1,
                       sampling=SamplingConfig(policy="fixed", temperature=1e-4, top_p=1e-6), keep_unanimous=True,
                       judge=JudgeConfig(mode="likelihood", tie_margin=0.0))
    judge = make_judge(model, tok, cfg.judge)
    lockstep = search_chunk(problems, task, model_proposer(model, tok, cfg), judge, cfg)
    assert search_inflight(problems, task, model, tok, judge, cfg, unit_size=2) == lockstep
    events = [e for t in lockstep for e in t["events"]]
    assert events and all(e.get("unanimous") and not e["tie"] for e in events)
    assert all(t["rollbacks"] == 0 for t in lockstep)


def test_run_search_inflight_equals_lockstep_driver(tmp_path, tiny):
    from psr.files import read_jsonl
    from psr.search import run_search

    model, tok = tiny
    common = dict(model="tiny-random", limit=4, width=2, max_steps=2, max_step_tokens=8, chunk_size=2)
    run_search(SearchConfig(**common, out=str(tmp_path / "a")), model, tok, progress=False)
    run_search(SearchConfig(**common, driver="lockstep", out=str(tmp_path / "b")), model, tok, progress=False)
    a, b = read_jsonl(tmp_path / "a" / "search.jsonl"), read_jsonl(tmp_path / "b" / "search.jsonl")
    assert [t["problem_id"] for t in a] == [t["problem_id"] for t in b]
    # lockstep seeds torch per chunk (its global RNG), in-flight per request: same problems, same format
    assert all(set(x) == set(y) for x, y in zip(a, b))
    assert not list((tmp_path / "a" / "search_chunks").glob("claims.*"))  # claims are cleared
