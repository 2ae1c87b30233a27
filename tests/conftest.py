import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K = SHARED / "gsm8k" / "train.jsonl"
MATH500 = SHARED / "math500" / "test.jsonl"


def jsonl_row(path: Path, lineno: int) -> dict:
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return json.loads(line)
    raise IndexError(lineno)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the built-in tiny-random model."""
    from psr.models import load_model

    return load_model("tiny-random")


needs_shared = pytest.mark.skipif(not GSM8K.exists(), reason="../shared/data not present")
