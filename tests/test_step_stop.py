"""Issue 30: the step stop in O(new tokens) (``StepStopScanner``, ``StepStopTracker``) against the check it
replaces (``stop_reached`` on the whole decoded completion at every decode step): the same stop point, so the
same cut text, on scripted outputs."""

import random

import pytest
import torch

from psr.generation import (
    FullDecodeStepStopping,
    StepBoundaryStopping,
    StepStopScanner,
    StepStopTracker,
    cut_after_answer,
    cut_at_step_boundary,
    stop_reached,
)

PIECES = ["Step", " Step", "\nStep", "Step 2", " 3", "12", ":", " :", "\n", " ", "\t", "\u00a0", "\u3000", "x",
          "S", "te", "p", "\\boxed{", "\\boxed", "{", "}", "5", "٣", "=", ".", "\n\n", "Ste", "\\box", "ed{",
          "é", "日本"]
SCRIPTS = [
    "Step 1: 2 + 3 = 5.\nStep 2: 5 * 2 = 10.",
    "\n\nStep 2: 3 + 4 = 7. Step 3: 7 - 1 = 6.",
    "Step 1: So \\boxed{\\frac{1}{2}}.\nStep 2: more",
    "Step 1: \\boxed{ \\boxed{5}\nx} \n",
    "Step 1: \\boxed{ \\boxed{5}} then text\n",
    "Step 3: done \\boxed{4 + {1}}. See\nStep 4:",
    "Step 1: Step12:",
    "Step 1: a Step  7 \t :",
    "Step 1: a Step 7 8 : b Step\u00a09:",
    "   \n Step 1: x\nStep\n2:",
    "Step 1: \\boxed{4}",
    "Step 1: \\boxed{4",
]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice(["", "Step 1: ", "\n "]) + "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40)))
            for _ in range(n)]


def first_stop_chars(text, at_step):
    """(old, new): the first prefix length at which each check stops, char by char (None: never)."""
    old = next((k for k in range(len(text) + 1) if stop_reached(text[:k], at_step)), None)
    scanner, new = StepStopScanner(at_step), None
    if scanner.feed(""):
        new = 0
    for k, ch in enumerate(text, 1):
        if new is None and scanner.feed(ch):
            new = k
    return old, new


@pytest.mark.parametrize("at_step", [True, False])
def test_scanner_stops_where_the_full_check_does_at_every_character(at_step):
    for text in SCRIPTS + random_texts(1500, seed=int(at_step)):
        old, new = first_stop_chars(text, at_step)
        assert old == new, (text, old, new)


def first_stop_tokens(tok, ids, at_step):
    old = next((k for k in range(1, len(ids) + 1)
                if stop_reached(tok.decode(ids[:k], skip_special_tokens=True), at_step)), None)
    tracker = StepStopTracker(tok, at_step)
    new = next((k for k in range(1, len(ids) + 1) if tracker.update(ids[:k])), None)
    return old, new


@pytest.mark.parametrize("at_step", [True, False])
def test_tracker_stops_at_the_same_token_as_full_decoding(tiny, at_step):
    """Token by token on the tiny model's tokenizer: scripted texts, and random ids (bytes cut mid-character,
    special tokens)."""
    _, tok = tiny
    rng = random.Random(3)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in SCRIPTS + random_texts(300, seed=7)]
    seqs += [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))] for _ in range(200)]
    stops = 0
    for ids in seqs:
        old, new = first_stop_tokens(tok, ids, at_step)
        assert old == new, (tok.decode(ids), old, new)
        stops += old is not None
    assert stops > 20  # the scripts do reach stops


def test_embedded_tokenizer_same_stops():
    """SmolLM2's own tokenizer (byte-level BPE, the model the toolkit ships), when it is cached."""
    from psr.models import load_tokenizer

    try:
        tok = load_tokenizer("smollm2-135m")
    except Exception as err:  # pragma: no cover - no cached copy
        pytest.skip(f"embedded tokenizer unavailable: {err}")
    rng = random.Random(11)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in SCRIPTS + random_texts(200, seed=5)]
    seqs += [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))] for _ in range(100)]
    for at_step in (True, False):
        for ids in seqs:
            old, new = first_stop_tokens(tok, ids, at_step)
            assert old == new, (tok.decode(ids), old, new)


@pytest.mark.parametrize("at_step", [True, False])
def test_hf_criterion_cuts_the_same_text_as_the_full_decode_one(tiny, at_step):
    """A batch decoded step by step as ``generate`` does (rows padded once they stop): the new criterion stops
    each row at the same step as the old one, so the cut text is the same."""
    _, tok = tiny
    texts = SCRIPTS + random_texts(40, seed=9)
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt = tok("Question?", add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    crits = {"old": FullDecodeStepStopping(tok, len(prompt), at_step),
             "new": StepBoundaryStopping(tok, len(prompt), at_step)}
    cut = cut_at_step_boundary if at_step else cut_after_answer
    outs = {}
    for name, crit in crits.items():
        done_at = [None] * len(rows)
        for k in range(1, width + 1):
            ids = torch.tensor([prompt + [r[j] if j < len(r) and (d is None or j < d) else pad for j in range(k)]
                                for r, d in zip(rows, done_at)])
            flags = crit(ids, None)
            done_at = [d if d is not None else (k if f else None) for d, f in zip(done_at, flags.tolist())]
        outs[name] = [cut(tok.decode(r[: d or len(r)], skip_special_tokens=True)).strip()
                      for r, d in zip(rows, done_at)]
        outs[name + "_at"] = done_at
    assert outs["old_at"] == outs["new_at"]
    assert outs["old"] == outs["new"]
