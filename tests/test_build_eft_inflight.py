"""Issue 30: build-eft's in-flight driver (psr.build_eft.InflightEFT) against the lockstep one (search_chunk) on
the tiny model: with per-request seeds and per-problem draws both give the same step rows, whatever the units,
the problems in flight or the batch size, for the exact and the rollout annotator, with the length guard too;
and run_build_eft resumes a killed build as if it had not been killed, whatever its chunk size or driver."""

import pytest

from psr.build_eft import (
    ROLLOUT_SAMPLING,
    BuildEFTConfig,
    annotate,
    model_completer,
    run_build_eft,
    search_chunk,
    search_inflight,
)
from psr.files import read_jsonl
from psr.lengths import token_count
from psr.steps import render_prompt
from psr.tasks import ArithmeticTask, TaskConfig


class LenientTask(ArithmeticTask):
    """The arithmetic problems with checks that the tiny model's random text passes about half the time (by its
    length), so that steps have several right candidates (the draw of the next step matters), rollouts reach the
    "gold" in fractions, and paths go on along the model's own candidates."""

    def check_step(self, problem, prefix, step):
        return None if not step.strip() else len(step) % 3 != 0

    def check_answer(self, problem, solution):
        return len(solution) % 2 == 0


@pytest.fixture(scope="module")
def setup(tiny):
    model, tok = tiny
    task = LenientTask(min_steps=2, max_steps=3)
    return model, tok, task, task.problems("train", 5, seed=0)


def _config(annotator, **kw):
    settings = dict(model="tiny-random", width=3, max_steps=3, max_step_tokens=8, batch_size=6, annotator=annotator,
                    rollouts=2, rollout_max_new_tokens=8)
    return BuildEFTConfig(**{**settings, **kw})


def _lockstep(model, tok, task, problems, cfg):
    propose = model_completer(model, tok, cfg, cfg.sampling, cfg.max_step_tokens, stop_at_step=True)
    rollout = model_completer(model, tok, cfg, ROLLOUT_SAMPLING, cfg.rollout_max_new_tokens, stop_at_step=False)
    return search_chunk(problems, propose, annotate(task, cfg, rollout), cfg)


@pytest.mark.parametrize("annotator", ["exact", "rollout"])
def test_inflight_rows_equal_lockstep_whatever_the_batching(setup, annotator):
    model, tok, task, problems = setup
    cfg = _config(annotator)
    lockstep = _lockstep(model, tok, task, problems, cfg)
    # the search did what the comparison needs: several steps per problem, steps with two or more right
    # candidates (so the draw of the next step matters), and, with rollouts, shares between 0 and 1
    assert len(lockstep) > len(problems)
    assert [r["problem_id"] for r in lockstep] == sorted(r["problem_id"] for r in lockstep)  # problem by problem
    assert any(sum(x is True for x in r["labels"]) >= 2 for r in lockstep if r["step_index"] == 0)
    assert any(r["step_index"] >= 1 and r["previous_steps"][0] in lockstep[0]["candidates"] for r in lockstep[:3])
    if annotator == "rollout":
        assert any(0 < s < 1 for r in lockstep for s in r["rollout_shares"])
    else:
        assert all(r["rollout_shares"] is None for r in lockstep)
    assert all(len(set(r["candidates"])) > 1 for r in lockstep)  # each candidate its own seed
    assert search_inflight(problems, task, model, tok, cfg, unit_size=2) == lockstep
    # one problem in flight, one candidate prompt (and one rollout prompt) per generate call, units of one
    one = _config(annotator, inflight=1, batch_size=3)
    assert search_inflight(problems, task, model, tok, one, unit_size=1) == lockstep
    # all in flight, bigger batches, one unit
    assert search_inflight(problems, task, model, tok, _config(annotator, batch_size=12), unit_size=None) == lockstep
    # a problem's rows do not depend on its neighbours
    assert search_inflight(problems[2:3], task, model, tok, cfg) == [r for r in lockstep
                                                                     if r["problem_id"] == problems[2].id]
    # another seed: other candidates (the seeds come from the config, not from torch's global RNG)
    other = search_inflight(problems, task, model, tok, _config(annotator, seed=1), unit_size=2)
    assert [r["candidates"] for r in other][:1] != [r["candidates"] for r in lockstep][:1]


@pytest.mark.parametrize("annotator", ["exact", "rollout"])
def test_inflight_length_guard_equals_lockstep(setup, annotator, monkeypatch):
    """A context that holds the first step's prompt but not every later one: those problems stop with a
    too_long row; rollouts without room leave their candidate unsure (share None), in both drivers alike."""
    model, tok, task, problems = setup
    cfg = _config(annotator)
    first = [token_count(tok, render_prompt(tok, p.question, [])) for p in problems]
    monkeypatch.setattr(model, "psr_max_len", max(first) + cfg.max_step_tokens + 4, raising=False)
    lockstep = _lockstep(model, tok, task, problems, cfg)
    assert any(r.get("too_long") for r in lockstep) and not any(r.get("too_long") for r in lockstep[:1])
    for r in lockstep:
        if r.get("too_long"):
            assert r["candidates"] == r["labels"] == r["pairs"] == [] and r["rollout_shares"] is None
    if annotator == "rollout":
        assert any(s is None for r in lockstep for s in (r["rollout_shares"] or []))
    assert search_inflight(problems, task, model, tok, cfg, unit_size=2) == lockstep
    assert search_inflight(problems, task, model, tok, _config(annotator, inflight=1, batch_size=3)) == lockstep


@pytest.mark.parametrize("annotator", ["exact", "rollout"])
def test_run_build_eft_inflight_resumes_and_equals_other_chunkings_and_lockstep(tmp_path, tiny, annotator):
    model, tok = tiny
    common = dict(model="tiny-random", task=TaskConfig(name="arithmetic", min_steps=2, max_steps=2), limit=5,
                  width=3, max_steps=3, max_step_tokens=8, annotator=annotator, rollouts=2, rollout_max_new_tokens=8)
    cfg = BuildEFTConfig(**common, chunk_size=2, out=str(tmp_path / "a" / "eft.jsonl"))
    stats = run_build_eft(cfg, model, tok, progress=False)
    assert stats["problems"] == 5 and stats["candidates"] == 3 * stats["steps"] >= 3 * 5
    steps, rows = (tmp_path / "a" / "eft.jsonl.steps.jsonl").read_text(), (tmp_path / "a" / "eft.jsonl").read_text()
    chunks = tmp_path / "a" / "eft.jsonl.chunks"
    assert [len({r["problem_id"] for r in read_jsonl(chunks / f"{c:05d}.jsonl")}) for c in range(3)] == [2, 2, 1]
    # killed after two chunks: the lost one is searched again, the same way; the others are kept
    kept = (chunks / "00000.jsonl").stat().st_mtime_ns
    (chunks / "00001.jsonl").unlink()
    run_build_eft(cfg, model, tok, progress=False)
    assert (tmp_path / "a" / "eft.jsonl.steps.jsonl").read_text() == steps
    assert (tmp_path / "a" / "eft.jsonl").read_text() == rows
    assert (chunks / "00000.jsonl").stat().st_mtime_ns == kept
    # other units, problems in flight and batches; and the lockstep driver: the same steps, the same EFT rows
    for i, other in enumerate([dict(chunk_size=3, inflight=1, batch_size=3), dict(chunk_size=2, driver="lockstep")]):
        out = tmp_path / f"b{i}" / "eft.jsonl"
        run_build_eft(BuildEFTConfig(**common, **other, out=str(out)), model, tok, progress=False)
        assert out.with_name("eft.jsonl.steps.jsonl").read_text() == steps, other
        assert out.read_text() == rows, other


def test_model_annotator_keeps_to_the_lockstep_driver(setup):
    from psr.build_eft import InflightEFT

    model, tok, task, _ = setup
    with pytest.raises(ValueError, match="lockstep"):
        InflightEFT(model, tok, task, BuildEFTConfig(annotator="model", annotator_model="tiny-random"))
