"""Numbers and data to trust: caches reused only when what made them matches, and disjoint training, search
and held-out data, checked at run start (psr.chunks, psr.disjoint)."""

import json
from pathlib import Path

import pytest

from psr.config import load_config
from psr.disjoint import check_disjoint, round_offset, round_problems, training_sets
from psr.files import DataError, read_jsonl
from psr.rounds import RunConfig, Stage, forget

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"


def test_a_search_run_again_with_another_width_searches_again(tmp_path, tiny, capsys):
    """Same --out, another width: the old width-2 chunks are not merged as width-3 traces (they were)."""
    from psr.config import from_dict
    from psr.search import SearchConfig, run_search

    model, tok = tiny
    base = dict(model="tiny-random", limit=2, chunk_size=1, max_steps=1, max_step_tokens=6, out=str(tmp_path / "s"),
                judge={"aggregation": "sum", "tie_margin": 0.0})
    run_search(from_dict(SearchConfig, {**base, "width": 2}), model, tok, progress=False)
    (tmp_path / "s" / "search_chunks" / ".00001.jsonl.abc123").write_text('{"cut')  # a write a kill cut short
    stats = run_search(from_dict(SearchConfig, {**base, "width": 3}), model, tok, progress=False)
    assert not list((tmp_path / "s" / "search_chunks").glob(".*"))
    assert "made by another config or model (width); starting over" in capsys.readouterr().err
    assert stats["config"]["width"] == 3
    assert {len(e["candidates"]) for t in read_jsonl(tmp_path / "s" / "search.jsonl") for e in t["events"]} == {3}


def test_the_tiny_run_is_disjoint_and_its_rounds_search_after_init():
    cfg = load_config(RunConfig, TINY)
    check_disjoint(cfg)
    assert round_offset(cfg, 1) == 8 and round_offset(cfg, 2) == 14  # IFT: the stream's first 8 problems
    ift = next(iter(training_sets(cfg).values()))
    assert not ift & {" ".join(p.question.split()) for p in round_problems(cfg, 1)}


def test_a_round_that_would_search_init_problems_is_refused_naming_both():
    cfg = load_config(RunConfig, TINY, {"search": {"offset": 0}})
    with pytest.raises(DataError, match=r"round 1's search \(problems 0-5\) and init's IFT problems \(the task's "
                                        r"first 8\) share 6 problem\(s\).*set search.offset: 8 \(the first place"):
        check_disjoint(cfg)


def _gsm8k_file(path: Path, n: int) -> Path:
    rows = [{"question": f"Tom has {i} apples and buys 2. How many now?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_file_run_whose_rounds_overlap_its_ift_file_is_refused(tmp_path):
    """The 7B recipe's shape: IFT rows built from the task's file, rounds searching the same file from row 0."""
    from psr.build_ift import BuildIFTConfig, run_build_ift
    from psr.tasks import TaskConfig

    data = _gsm8k_file(tmp_path / "train.jsonl", 30)
    stats = run_build_ift(BuildIFTConfig(task=TaskConfig(name="gsm8k", data=str(data)), limit=10,
                                         out=str(tmp_path / "ift.jsonl")))
    overrides = {"task": {"name": "gsm8k", "data": str(data)}, "problems_per_round": 5, "benchmarks": [],
                 "judge_eval_limit": 0, "init": {"ift_data": str(tmp_path / "ift.jsonl"), "eft_examples": 0},
                 "search": {"offset": 0}}
    with pytest.raises(DataError, match=r"round 1's search \(problems 0-4\) and init.ift_data .* share 5.*"
                                        r"set search.offset: 10 "):
        check_disjoint(load_config(RunConfig, TINY, overrides))
    overrides["search"]["offset"] = stats["next_offset"]  # what build-ift says: start after the rows it read
    check_disjoint(load_config(RunConfig, TINY, overrides))
    # a benchmark holding out rows the run trains on is refused too
    overrides["benchmarks"] = [{"name": "gsm8k", "task": {"name": "gsm8k", "data": str(data)}, "offset": 12,
                                "limit": 4}]
    with pytest.raises(DataError, match=r"benchmark gsm8k and round 1's search \(problems 10-14\) share 3"):
        check_disjoint(load_config(RunConfig, TINY, overrides))


def test_restart_forgets_a_stages_caches(tmp_path):
    cfg = load_config(RunConfig, TINY)
    init, rnd = tmp_path / "init", tmp_path / "psr" / "round_1"
    caches = [init / "ift_pass", init / "eft_search", init / ".model.partial", rnd / "search_chunks",
              rnd / ".model.partial", rnd / "eval_arithmetic.json.parts", rnd / "tts_arithmetic" / "search_chunks"]
    for c in caches:
        c.mkdir(parents=True)
        (c / "00000.jsonl").write_text("{}\n")
    for kind, d in (("init", init), ("search", rnd), ("train", rnd), ("eval", rnd)):
        (d / f"{kind}.done").write_text("{}")
        forget(Stage(f"x/{kind}", kind, d, None), cfg)
        assert not (d / f"{kind}.done").exists()
    assert not [c for c in caches if c.exists()]
