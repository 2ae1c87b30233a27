"""Bad inputs and damaged artifacts (issue 21): each gives one clear line naming the file, line, key or
value (exit 2 through the CLI), a counted and reported skip, or, for a run's own artifacts, a warning
naming the file and the stage redone. One test per class of fault; tiny-random only."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from psr.cli import main
from psr.config import ConfigError, load_config
from psr.files import DataError, read_jsonl
from psr.models import ModelLoadError, load_model, tiny_model_path
from psr.rounds import RunConfig, iterate, model_of, resolve_in_run
from psr.tasks import JsonlMathTask

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
FAST = ["--report-to", "[]", "--no-progress"]


def _gsm8k(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
                            for i in range(n)))
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


# ---- data files ----------------------------------------------------------------------------------
def test_a_latin1_byte_is_one_line_naming_file_and_line_through_the_cli(tmp_path):
    data = _gsm8k(tmp_path / "latin1.jsonl")
    data.write_bytes(data.read_bytes() + b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    out = subprocess.run([sys.executable, "-m", "psr.cli", "eval", "--model", "tiny-random", "--task", "gsm8k",
                          "--data", str(data)], env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"psr eval: error: {data}:4: not UTF-8 text (byte 0xe9 at column 18); save the file as UTF-8")


def test_directory_bom_and_field_types(tmp_path, capsys):
    assert main(["eval", "--model", "tiny-random", "--task", "gsm8k", "--data", str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory, not a JSONL file" in _err(capsys)
    bom = _gsm8k(tmp_path / "bom.jsonl")
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())  # as some editors save UTF-8: accepted
    assert [p.gold for p in JsonlMathTask(kind="gsm8k", data=str(bom)).problems()] == ["1", "2", "3"]
    for answer, kind in ((42, "int"), (["#### 1"], "list")):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps({"question": "q", "answer": answer}) + "\n")
        with pytest.raises(DataError, match=rf"{kind}.jsonl:1: field 'answer' must be a string, got {kind}$"):
            JsonlMathTask(kind="gsm8k", data=str(path)).problems()
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: tiny-random\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: not UTF-8 text \(byte 0xe9\)"):
        load_config(RunConfig, recipe)


# ---- sizes and silently ignored values -------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--samples", "-2"], "samples must be >= 0, got -2"),
    (["--limit", "-1"], "limit must be >= 1 (or null), got -1"),
    (["--limit", "0"], "limit must be >= 1 (or null), got 0"),
    (["--offset", "-1"], "offset must be >= 0, got -1"),
    (["--split", "validation"], "split must be train or test for the arithmetic task"),
    (["--data", "F.jsonl"], "task: data is 'F.jsonl', but the arithmetic task generates its problems"),
])
def test_eval_refuses_sizes_and_values_it_would_ignore(flags, message, capsys):
    assert main(["eval", "--model", "tiny-random", "--task", "arithmetic", *flags]) == 2
    err = _err(capsys)
    assert err.startswith("psr eval: error: command line: ") and message in err and len(err.splitlines()) == 1


def test_search_and_run_sizes_are_checked(tmp_path, capsys):
    assert main(["search", "--model", "tiny-random", "--limit", "0"]) == 2
    assert "limit must be >= 1 (or null), got 0" in _err(capsys)
    assert main(["search", "--model", "tiny-random", "--srlm.samples", "1"]) == 2
    assert "srlm: samples must be >= 2, got 1" in _err(capsys)
    assert main(["iterate", "--config", str(TINY), "--run", str(tmp_path / "r"), "--benchmarks",
                 "[{name: a, max_new_tokens: 0}]"]) == 2
    assert "benchmarks[0]: max_new_tokens must be >= 1, got 0" in _err(capsys)


def test_offset_past_the_end_names_the_numbers(tmp_path, capsys):
    data = _gsm8k(tmp_path / "three.jsonl")
    assert main(["eval", "--model", "tiny-random", "--task", "gsm8k", "--data", str(data), "--offset", "3"]) == 2
    assert _err(capsys) == f"psr eval: error: no problems: offset 3 is past the end of {data} (3 rows)"


def test_a_dataset_too_small_for_the_rounds_is_refused_up_front(tmp_path):
    data = _gsm8k(tmp_path / "five.jsonl", 5)
    cfg = load_config(RunConfig, TINY, {"task": {"name": "gsm8k", "data": str(data)}, "problems_per_round": 4})
    # init's IFT takes the file's first rows (the tiny recipe: 8), so the rounds would need rows 8-15
    with pytest.raises(DataError, match=r"five.jsonl has 5 problems, but the rounds search rows 8-15 "
                                        r"\(problems_per_round 4 x rounds 2, from row 8"):
        iterate(cfg, tmp_path / "run", progress=False)
    # nothing ran (the run lock may have made the folder)
    assert not (tmp_path / "run" / "config.yaml").exists() and not list((tmp_path / "run").rglob("*.done"))


# ---- model directories -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root, src = tmp_path_factory.mktemp("models"), tiny_model_path()
    dirs = {}
    for case in ("truncated", "no_tokenizer", "model_type"):
        d = dirs[case] = root / case
        shutil.copytree(src, d)
    weights = dirs["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for f in dirs["no_tokenizer"].glob("tokenizer*"):
        f.unlink()
    config = json.loads((dirs["model_type"] / "config.json").read_text())
    (dirs["model_type"] / "config.json").write_text(json.dumps({**config, "model_type": "llamaa"}))
    return dirs


@pytest.mark.parametrize("case, message", [
    ("truncated", "model.safetensors: damaged safetensors file (Error while deserializing header"),
    ("no_tokenizer", "has no tokenizer files (one of tokenizer.json"),
    ("model_type", "config.json: model_type 'llamaa' is not a model type this transformers knows"),
])
def test_broken_model_directories_are_named_for_eval_and_train(case, message, broken_models, tmp_path, capsys):
    from psr.models import load_tokenizer
    from psr.train.step_dpo import oracle_pairs

    model = broken_models[case]
    assert main(["eval", "--model", str(model), "--limit", "1"]) == 2
    err = _err(capsys)
    assert len(err.splitlines()) == 1 and str(model) in err and message in err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(load_tokenizer("tiny-random"), 2)))
    assert main(["train", "--model", str(model), "--pairs", str(pairs), "--out", str(tmp_path / "m"), *FAST]) == 2
    assert message in _err(capsys)
    with pytest.raises(ModelLoadError, match=message.split(" (")[0]):
        load_model(str(model))


# ---- pairs files (psr train) -----------------------------------------------------------------------
def test_pairs_identical_empty_and_too_long_are_counted_or_refused(tmp_path, capsys, caplog):
    from psr.models import load_tokenizer
    from psr.train.step_dpo import oracle_pairs

    tok = load_tokenizer("tiny-random")
    rows = oracle_pairs(tok, 6, seed=1)
    rows[0]["rejected"] = rows[0]["chosen"]  # no signal: skipped and counted
    rows[1]["prompt"] += "filler words " * 200 + "\n"  # over max_prompt_length: dropped and counted
    rows[2]["chosen"] = rows[2]["chosen"] + " and so on" * 200  # over max_length: cut, and said so
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--model", "tiny-random", "--pairs", str(pairs), "--out", str(tmp_path / "m"), "--max-steps", "1",
            "--max-prompt-length", "400", "--max-length", "512", *FAST]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "step-DPO on 4 pairs; skipped 2 of 6 (1 chosen == rejected, 1 prompt too long); 1 cut at max_length" \
        in out.out
    assert f"{pairs}: skipped 1 of 6 pairs whose chosen == rejected (line 1)" in caplog.text
    assert "1 of 5 train pairs are longer than max_length 512 tokens" in caplog.text
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())
    assert (log["pairs"], log["pairs_in_file"], log["pairs_truncated"]) == (4, 6, 1)

    for r in rows:
        r["rejected"] = r["chosen"]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args) == 2
    assert _err(capsys) == f"psr train: error: {pairs}: all 6 pairs have chosen == rejected: nothing to learn from"
    pairs.write_text(json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(args) == 2
    assert _err(capsys) == f"psr train: error: {pairs}:1: field 'prompt' is empty"


# ---- search chunks -----------------------------------------------------------------------------------
def test_a_damaged_search_chunk_is_named_and_searched_again(tmp_path, tiny, capsys):
    from psr.config import from_dict
    from psr.search import SearchConfig, run_search

    model, tok = tiny
    cfg = from_dict(SearchConfig, dict(model="tiny-random", limit=6, chunk_size=2, width=2, max_steps=2,
                                       max_step_tokens=8, out=str(tmp_path / "s"), seed=3))
    run_search(cfg, model, tok, progress=False)
    first = (tmp_path / "s" / "search.jsonl").read_text()
    chunks = tmp_path / "s" / "search_chunks"
    cut = chunks / "00000.jsonl"
    cut.write_bytes(cut.read_bytes()[:-40])  # cut mid-line
    short = chunks / "00001.jsonl"
    short.write_text(short.read_text().splitlines(keepends=True)[0])  # its last line missing
    kept = (chunks / "00002.jsonl").stat().st_mtime_ns
    run_search(cfg, model, tok, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {cut}:2: not valid JSON" in err and "doing this search chunk again" in err
    assert f"warning: {short}: holds 1 of the chunk's 2 problems (missing arith-train-3-00003)" in err
    assert (chunks / "00002.jsonl").stat().st_mtime_ns == kept
    assert (tmp_path / "s" / "search.jsonl").read_text() == first


# ---- run folders -------------------------------------------------------------------------------------
def _small_run(**extra) -> RunConfig:
    bench = {"name": "arithmetic", "task": {"name": "arithmetic", "min_steps": 2, "max_steps": 3, "max_operand": 9},
             "limit": 2, "max_new_tokens": 8, "test_time_search": True, "test_time_limit": 1}
    return load_config(RunConfig, TINY, {"rounds": 1, "eval_m0": False, "judge_eval_limit": 2,
                                         "benchmarks": [bench], **extra})


def _artifacts(run_dir: Path) -> dict:
    from tests.test_rounds import _artifacts as artifacts

    return artifacts(run_dir)


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_artifacts_are_named_and_their_stages_redone(tmp_path, capsys):
    run = iterate(_small_run(), tmp_path / "run", progress=False)
    before, r1 = _artifacts(run), run / "psr" / "round_1"
    capsys.readouterr()

    # Half an eval.json beside its marker: psr report names it; the next start redoes that stage only.
    _half(run / "init" / "eval.json")
    assert main(["report", str(run)]) == 2
    assert f"{run / 'init' / 'eval.json'}: not valid JSON" in _err(capsys)
    # Half a model.safetensors: that round's training and what was built on it are redone.
    _half(r1 / "model" / "model.safetensors")
    done = {p: p.stat().st_mtime_ns for p in run.rglob("*.done")}
    iterate(_small_run(), run, progress=False)
    err = capsys.readouterr().err
    assert f"warning: {run / 'init' / 'eval.json'}: not valid JSON" in err and "redoing init/eval\n" in err
    assert (f"warning: {r1 / 'model' / 'model.safetensors'}: damaged safetensors file" in err
            and "redoing psr/round_1/train and 1 stage(s) built on it" in err)
    redone = {p.relative_to(run).as_posix() for p, t in done.items() if p.stat().st_mtime_ns != t}
    assert redone == {"init/eval.done", "psr/round_1/train.done", "psr/round_1/eval.done"}
    assert _artifacts(run) == before

    # A truncated pairs.jsonl: the search is redone from its (checked) chunks, then train and eval.
    (r1 / "pairs.jsonl").write_text((r1 / "pairs.jsonl").read_text()[:150])
    iterate(_small_run(), run, progress=False)
    assert f"warning: {r1 / 'pairs.jsonl'}:1: not valid JSON" in capsys.readouterr().err
    assert _artifacts(run) == before

    # An empty init.done: init and everything after it.
    (run / "init" / "init.done").write_text("")
    iterate(_small_run(), run, progress=False)
    assert "init.done: empty file (expected a JSON object): redoing init/init and 4 stage(s)" in capsys.readouterr().err
    assert _artifacts(run) == before

    # A damaged config.yaml cannot be compared with: refused, naming it.
    (run / "config.yaml").write_text("name: [tiny\n")
    with pytest.raises(ConfigError, match=r"config.yaml: damaged, cannot compare"):
        iterate(_small_run(), run, progress=False)


def test_a_moved_run_folder_continues_and_restart_redoes_test_time_search(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    iterate(_small_run(), "../runs/K3", stop_after="search", progress=False)
    assert json.loads(Path("../runs/K3/init/init.done").read_text())["model"] == "init/model"  # not ../runs/K3/...

    shutil.move(tmp_path / "runs", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    run = Path("moved/K3")
    iterate(_small_run(), run, progress=False)  # resumed from another directory, in its new place
    assert json.loads((run / "psr" / "round_1" / "train.done").read_text())["model"] == "psr/round_1/model"
    assert model_of(run / "psr" / "round_1") == str(run / "psr" / "round_1" / "model")

    # --restart-from redoes the eval stages' test-time searches too, not just their markers.
    stale = run / "psr" / "round_1" / "tts_arithmetic" / "search_chunks" / "stale.jsonl"
    stale.write_text("{}\n")
    iterate(_small_run(), run, restart_from="psr/round_1/train", progress=False)
    assert not stale.exists() and read_jsonl(run / "psr" / "round_1" / "tts_arithmetic" / "search.jsonl")

    # Markers written before: a path relative to where the run was started, found by its tail.
    (run / "init" / "init.done").write_text(json.dumps({"model": "../runs/K3/init/model"}))
    assert model_of(run / "init") == str(run / "init" / "model")
    assert resolve_in_run("tiny-random", run) == "tiny-random"
