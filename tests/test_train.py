"""Training stages on tiny-random: step-DPO's label mask (no EOS after a step), learning, SFT's
completion-only loss, saving/reloading, bad pairs files, EFT/IFT data, and the CLI quick forms."""

import json
from pathlib import Path

import pytest

from psr.cli import main
from psr.config import load_config
from psr.judge import VERDICT_PREFIX
from psr.models import load_model, load_tokenizer
from psr.tasks import DataError, TaskConfig
from psr.tasks.arithmetic import ArithmeticTask
from psr.train.sft import InitConfig, build_eft, build_ift, generate_eft, read_eft_file, read_ift_file
from psr.train.sft import build_trainer as build_sft_trainer
from psr.train.step_dpo import StepDPOConfig, load_pairs, oracle_pairs, run_train, step_logps, tokenize_pair
from psr.train.step_dpo import build_trainer as build_dpo_trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(report_to=[], progress=False)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(tok, 12, seed=3)))
    return path


def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


# ---- step-DPO: the tokenised batch ----------------------------------------------------------
def test_step_tokens_carry_the_loss_and_no_eos_follows_a_step(tmp_path, tok, pairs_file):
    cfg = StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(tmp_path / "m"), batch_size=4, max_steps=1,
                        **FAST)
    trainer = build_dpo_trainer(cfg)
    rows = load_pairs(pairs_file)
    eos = tok.eos_token_id
    # The prepared dataset: each step's ids are exactly its own tokens after the prompt, ending on its last token.
    for row, ex in zip(rows, trainer.train_dataset):
        prompt_ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ex["prompt_ids"] == prompt_ids
        for key in ("chosen", "rejected"):
            full = tok(row["prompt"] + row[key], add_special_tokens=False)["input_ids"]
            assert ex[f"{key}_ids"] == full[len(prompt_ids):]
            assert ex[f"{key}_ids"][-1] == tok(row[key], add_special_tokens=False)["input_ids"][-1] != eos
            assert tok.decode(ex[f"{key}_ids"]) == row[key]
    # The collated batch: only completion (step) tokens are in the loss, and none of them is EOS.
    batch = _first_batch(trainer)
    ids, mask, attn = batch["input_ids"], batch["completion_mask"], batch["attention_mask"]
    assert ids.shape[0] == 2 * 4  # chosen rows then rejected rows
    for i in range(ids.shape[0]):
        step = ids[i][mask[i].bool()].tolist()
        assert step and eos not in step
        assert tok.decode(step).startswith("Step ")
        last_real = int(attn[i].nonzero().max())
        assert mask[i, last_real] == 1 and ids[i, last_real] != eos  # the sequence ends on the step's own last token
        first = int(mask[i].nonzero().min())
        assert tok.decode(ids[i, :first]).endswith(("<|im_start|>assistant\n", "\n"))


def test_plain_trl_would_append_eos(tmp_path, tok, pairs_file):
    """What the override is for: TRL 1.16's DPOTrainer ends every plain-text completion with EOS."""
    from trl import DPOTrainer

    cfg = StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(tmp_path / "m"), max_steps=1, **FAST)
    trainer = build_dpo_trainer(cfg, trainer_class=DPOTrainer)
    assert all(ex["chosen_ids"][-1] == tok.eos_token_id for ex in trainer.train_dataset)


def test_solution_rows_keep_eos_and_merged_prompts_are_handled(tok):
    t = tokenize_pair(tok, "Q:\n", "Step 1: 1 + 1 = 2.", "Step 1: 1 + 1 = 3.", eos=True)
    assert t["chosen_ids"][-1] == tok.eos_token_id and not t["merged"]
    t = tokenize_pair(tok, "Q: Step", " 1: done.", " 1: undone.")  # no token boundary at the prompt's end
    assert tok.decode(t["prompt_ids"]) + tok.decode(t["chosen_ids"]) == "Q: Step 1: done."


def test_margin_grows_after_a_few_dpo_steps(tmp_path, pairs_file):
    rows = load_pairs(pairs_file)[:8]
    model, tok = load_model("tiny-random", device="cpu")
    c0, r0 = step_logps(model, tok, rows)
    cfg = StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(tmp_path / "m"), batch_size=4, max_steps=6,
                        learning_rate=3e-3, beta=0.1, **FAST)
    trainer = build_dpo_trainer(cfg)
    trainer.train()
    c1, r1 = step_logps(trainer.model, tok, rows)
    before = sum(c - r for c, r in zip(c0, r0)) / len(rows)
    after = sum(c - r for c, r in zip(c1, r1)) / len(rows)
    assert after > before + 1.0, (before, after)
    logged = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logged and logged[-1]["rewards/margins"] > 0


def test_sft_weight_keeps_the_chosen_step_likely(tmp_path, pairs_file):
    """sft_weight adds TRL's NLL-on-chosen term: with it the chosen steps' log-prob ends higher than
    with DPO alone, on the same pairs, seed and steps."""
    rows = load_pairs(pairs_file)[:8]
    chosen = {}
    for weight in (0.0, 1.0):
        cfg = StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(tmp_path / f"m{weight}"), batch_size=4,
                            max_steps=6, learning_rate=3e-3, beta=0.1, sft_weight=weight, **FAST)
        trainer = build_dpo_trainer(cfg)
        assert trainer.args.loss_type == (["sigmoid", "sft"] if weight else ["sigmoid"])
        trainer.train()
        c, _ = step_logps(trainer.model, trainer.processing_class, rows)
        chosen[weight] = sum(c) / len(c)
    assert chosen[1.0] > chosen[0.0] + 0.5, chosen
    with pytest.raises(ValueError, match="sft_weight"):
        StepDPOConfig(model="tiny-random", sft_weight=-1)


def test_lora_precompute_and_rerendered_prompts(tmp_path, tok, pairs_file):
    out = tmp_path / "lora"
    log = run_train(StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(out), batch_size=4, max_steps=2,
                                  lora=True, lora_r=4, precompute_ref_log_probs=True, prompt_from="render",
                                  learning_rate=1e-3, **FAST))
    assert log["final"]["loss"] > 0 and log["pairs"] == 12
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()  # merged
    model, _ = load_model(str(out), device="cpu")
    assert not hasattr(model, "peft_config")
    out2 = tmp_path / "adapter"
    run_train(StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(out2), batch_size=4, max_steps=1,
                            lora=True, lora_r=4, save_adapter=True, **FAST))
    assert (out2 / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    assert hasattr(AutoModelForCausalLM.from_pretrained(str(out2)), "peft_config")


# ---- saving ----------------------------------------------------------------------------------
def test_saved_round_model_reloads_and_generates(tmp_path, pairs_file):
    from psr.generation import generate
    from psr.steps import render_prompt

    out = tmp_path / "round_1" / "model"
    log = run_train(StepDPOConfig(model="tiny-random", pairs=str(pairs_file), out=str(out), batch_size=4, max_steps=2,
                                  learning_rate=1e-3, progress=False))
    assert not (tmp_path / "round_1" / ".model.partial").exists()
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["timing"]["steps"] == 2 and saved["config"]["pairs"] == str(pairs_file)
    assert any("rewards/margins" in h for h in saved["log_history"]) and log["peak_rss_mb"] > 0
    assert list((tmp_path / "round_1" / "tensorboard" / "model").glob("events.out.tfevents.*"))
    model, tok = load_model(str(out), device="cpu")
    text = generate(model, tok, [render_prompt(tok, "What is 2 + 3?")], max_new_tokens=6, progress=False)[0][0]
    assert isinstance(text, str)
    # A second run replaces the model only once its own is complete.
    run_train(StepDPOConfig(model=str(out), pairs=str(pairs_file), out=str(out), batch_size=4, max_steps=1, **FAST))
    assert json.loads((out / "train_log.json").read_text())["config"]["model"] == str(out)


# ---- bad pairs files -------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("", "no pairs (the file is empty)"),
    ("\n\n", "no pairs (the file is empty)"),
    ('{"prompt": "p\\n", "chosen": "Step 1: a"}\n', ":1: missing field 'rejected'"),
    ('{"prompt": "p\\n", "chosen": "Step 1: a", "rejected": "Step 1: b"}\n{"prompt": "p", "rejected": "x"}\n',
     ":2: missing field 'chosen'"),
    ('{"prompt": "p\\n", "chosen": "", "rejected": "Step 1: b"}\n', ":1: field 'chosen' is empty"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}\n', ":1: field 'prompt' must be a string"),
    ('{"prompt": "p\\n", "chosen": "a", "rejected": "b"}\nnot json\n', ":2: not valid JSON"),
    ('[1, 2]\n', ":1: expected a JSON object"),
])
def test_bad_pairs_files_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_pairs_through_the_cli(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p\\n", "chosen": "Step 1: a"}\n')
    assert main(["train", "--model", "tiny-random", "--pairs", str(path), "--out", str(tmp_path / "m")]) == 2
    assert f"{path}:1: missing field 'rejected'" in capsys.readouterr().err
    missing = str(tmp_path / "none.jsonl")
    assert main(["train", "--model", "tiny-random", "--pairs", missing, "--out", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "question": "q"}\n')
    with pytest.raises(DataError, match=":1: missing field 'previous_steps'"):
        # what prompt_from: render needs
        load_pairs(path, ("prompt", "chosen", "rejected", "question", "previous_steps"))


# ---- SFT (init) ------------------------------------------------------------------------------
def test_sft_loss_covers_completions_only(tmp_path, tok):
    cfg = InitConfig(model="tiny-random", out=str(tmp_path / "m1"), ift_examples=4, eft_examples=4, batch_size=8,
                     max_steps=1, **FAST)
    trainer = build_sft_trainer(cfg)
    rows = {r["prompt"]: r["completion"] for r in trainer.psr_data["ift"] + trainer.psr_data["eft"]}
    batch = _first_batch(trainer)
    assert batch["input_ids"].shape[0] == 8
    for ids, labels, attn in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(attn.sum())
        text = tok.decode(ids[:n])
        prompt = next(p for p in rows if text.startswith(p))
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == -100).all()  # no loss on the prompt
        assert (labels[n_prompt:n] == ids[n_prompt:n]).all()  # loss on every completion token ...
        assert (labels[n:] == -100).all()  # ... and none on padding
        assert tok.decode(ids[n_prompt:n]) == rows[prompt] + tok.eos_token  # the completion, closed by EOS


def test_eft_data_is_balanced_exact_and_in_the_judge_format(tok):
    task = ArithmeticTask()
    rows = generate_eft(task, tok, 40, seed=1)
    assert len(rows) == 40 and sum(r["verdict"] == "A" for r in rows) == 20
    by_id = {p.id: p for p in task.problems("train", 40, seed=2)}
    for r in rows:
        p = by_id[r["problem_id"]]
        good, bad = (r["step_a"], r["step_b"]) if r["verdict"] == "A" else (r["step_b"], r["step_a"])
        assert task.check_step(p, r["previous_steps"], good) is True
        assert task.check_step(p, r["previous_steps"], bad) is False
        assert r["prompt"].endswith("<|im_start|>assistant\n") and "Candidate A:\n" + r["step_a"] in r["prompt"]
        assert r["completion"] == f"{VERDICT_PREFIX}{r['verdict']}]]"
    both = generate_eft(task, tok, 10, seed=1, both_orders=True, with_justification=True)
    assert [r["verdict"] for r in both[:2]] == ["A", "B"] and both[0]["step_a"] == both[1]["step_b"]
    assert both[0]["completion"].startswith("Candidate A is right") and both[0]["completion"].endswith("Verdict: [[A]]")


def test_ift_and_eft_from_files(tmp_path, tok):
    ift = tmp_path / "ift.jsonl"
    ift.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Tom has 3 apples and buys 2. How many?", "answer": "He has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
        {"question": "What is 2 * 4?", "steps": ["2 * 4 = 8.", "The answer is \\boxed{8}."]},
        {"prompt": "raw prompt\n", "completion": "Step 1: raw."},
    ]) + "\n")
    rows = read_ift_file(str(ift), tok)
    assert rows[0]["completion"] == "Step 1: He has 3 + 2 = 5 apples. The answer is \\boxed{5}.\n"
    assert rows[1]["completion"] == "Step 1: 2 * 4 = 8.\nStep 2: The answer is \\boxed{8}.\n"
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and rows[2]["prompt"] == "raw prompt\n"
    eft = tmp_path / "eft.jsonl"
    eft.write_text(json.dumps({"question": "q", "previous_steps": [], "step_a": "Step 1: 1 + 1 = 2.",
                               "step_b": "Step 1: 1 + 1 = 3.", "verdict": "A",
                               "justification": "A adds right."}) + "\n")
    assert read_eft_file(str(eft), tok)[0]["completion"] == "Verdict: [[A]]"
    assert read_eft_file(str(eft), tok, with_justification=True)[0]["completion"] == "A adds right.\nVerdict: [[A]]"
    cfg = InitConfig(model="tiny-random", ift_data=str(ift), eft_data=str(eft))
    assert len(build_ift(cfg, tok)) == 3 and len(build_eft(cfg, tok)) == 1
    for content, message in [
        ({"question": "q"}, ":1: missing field 'answer'"),
        ({"question": "q", "answer": "no gold"}, ":1: field 'answer' has no '#### <answer>'"),
        ({"prompt": "p"}, ":1: missing field 'completion'"),
        ({"answer": "#### 3"}, ":1: missing field 'question'"),
    ]:
        ift.write_text(json.dumps(content) + "\n")
        with pytest.raises(DataError, match=message):
            read_ift_file(str(ift), tok)
    for content, message in [
        ({"question": "q", "step_a": "a", "step_b": "b", "verdict": "C"}, ":1: field 'verdict' must be"),
        ({"question": "q", "step_a": "a", "verdict": "A"}, ":1: missing field 'step_b'"),
        ({"question": "q", "step_a": "a", "step_b": "b", "verdict": "A", "previous_steps": "x"},
         "'previous_steps' must be a list"),
    ]:
        eft.write_text(json.dumps(content) + "\n")
        with pytest.raises(DataError, match=message):
            read_eft_file(str(eft), tok)
    with pytest.raises(DataError, match="needs eft_data"):
        build_eft(InitConfig(task=TaskConfig(name="gsm8k", data=str(ift))), tok)


# ---- commands --------------------------------------------------------------------------------
def test_cli_init_train_eval_quick_forms(tmp_path, capsys, tok):
    m1 = tmp_path / "m1"
    assert main(["init", "--model", "tiny-random", "--task", "arithmetic", "--out", str(m1), "--ift-examples", "6",
                 "--eft-examples", "6", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (m1 / "config.json").exists() and len((m1 / "eft.jsonl").read_text().splitlines()) == 6
    log = json.loads((m1 / "train_log.json").read_text())
    assert log["examples"] == {"ift": 6, "eft": 6} and log["timing"]["steps"] == 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(tok, 4)))
    m2 = tmp_path / "m2"
    assert main(["train", "--model", str(m1), "--pairs", str(pairs), "--out", str(m2), "--max-steps", "2",
                 "--batch-size", "2", "--beta", "0.2"]) == 0
    assert json.loads((m2 / "train_log.json").read_text())["config"]["beta"] == 0.2
    assert main(["eval", "--model", str(m2), "--task", "arithmetic", "--limit", "2", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 2


def test_recipes_and_bad_configs(tmp_path):
    for name in ("smollm2/init/config_full.yaml", "tiny/init/config_tiny.yaml"):
        cfg = load_config(InitConfig, ROOT / "recipes" / name)
        assert cfg.ift_examples and cfg.eft_examples
    for name in ("smollm2/train/config_full.yaml", "tiny/train/config_tiny.yaml"):
        cfg = load_config(StepDPOConfig, ROOT / "recipes" / name)
        assert cfg.beta > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: high\n")
    assert main(["train", "--config", str(bad)]) == 2
    bad.write_text("lora: false\nsave_adapter: true\n")
    assert main(["train", "--config", str(bad)]) == 2
    bad.write_text("corruptions: [typo]\n")
    assert main(["init", "--config", str(bad)]) == 2


def test_tiny_recipes_run_end_to_end(tmp_path):
    """recipes/tiny/{init,train}/config_tiny.yaml as `psr init` / `psr train` run them (outputs redirected to tmp)."""
    m1 = tmp_path / "init"
    assert main(["init", "--config", str(ROOT / "recipes/tiny/init/config_tiny.yaml"), "--out", str(m1)]) == 0
    tok = load_tokenizer(str(m1))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in oracle_pairs(tok, 8)))
    assert main(["train", "--config", str(ROOT / "recipes/tiny/train/config_tiny.yaml"), "--model", str(m1),
                 "--pairs", str(pairs), "--out", str(tmp_path / "round_1")]) == 0
    assert (tmp_path / "round_1" / "model.safetensors").exists()


def test_grouped_batches_hold_one_kind_and_both_orders_of_a_pair(tmp_path):
    cfg = InitConfig(model="tiny-random", out=str(tmp_path / "g"), ift_examples=6, eft_examples=12,
                     eft_both_orders=True, batch_size=4, batching="grouped", max_steps=1, **FAST)
    trainer = build_sft_trainer(cfg)
    tok = trainer.processing_class
    batches = [[tok.decode(x) for x in b["input_ids"]] for b in trainer.get_train_dataloader()]
    assert sum(map(len, batches)) == 18
    for texts in batches[:-1]:  # every full batch: one kind; EFT ones pair each question with both verdicts
        kinds = {"Candidate A" in t for t in texts}
        assert len(kinds) == 1
        if kinds == {True}:
            verdicts = [t.split("Verdict: [[")[1][0] for t in texts]
            assert verdicts == ["A", "B", "A", "B"]
    with pytest.raises(ValueError, match="even batch_size"):
        InitConfig(batching="grouped", eft_both_orders=True, batch_size=3)
