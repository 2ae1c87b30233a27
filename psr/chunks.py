"""Resumable chunks, one helper for the three stages that work problem by problem (search, evaluation,
build-eft): the problems go in fixed chunks, each saved as soon as it is done, so that a killed stage
resumes at its first unsaved chunk and, under several processes, ranks take chunks round-robin and rank
0 merges them in order.

A folder of chunks knows what made it: ``made_by.json`` holds the stage's config (output paths and
reporting settings left out) and the identity of its model (a directory's files, sizes and times). A
chunk is reused only when both match; otherwise the folder is emptied, with one line naming what
changed -- never reused in silence (a file's mere existence is no proof that it belongs to this run).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from psr.config import cosmetic_key
from psr.distributed import context
from psr.files import (
    DataError,
    path_identity,
    read_json,
    read_jsonl,
    remove_partial_writes,
    write_json_atomic,
    write_jsonl_atomic,
)


def made_by(settings: dict, *models: str | None) -> dict:
    """What makes a stage's chunks: its settings without outputs and reporting, and its models' identities
    (as JSON would store them, so that a stored copy compares equal)."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k != "out" and not cosmetic_key(k)}

    return json.loads(json.dumps({"config": strip(settings), "models": [path_identity(m) for m in models]},
                                 default=str))


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


class Chunks:
    """The chunks of ``problems`` (``size`` each) saved under ``root``, for one config and model (``made_by``).
    ``id_field`` names the problem id in a saved row; a chunk is whole when its rows' ids, in order and
    without repeats, are exactly its problems' ids."""

    def __init__(self, root: str | Path, made: dict, problems: list, size: int, id_field: str = "problem_id",
                 what: str = "chunk"):
        self.root, self.made, self.id_field, self.what = Path(root), made, id_field, what
        self.chunks = [problems[i : i + size] for i in range(0, len(problems), size)]

    def path(self, c: int) -> Path:
        return self.root / f"{c:05d}.jsonl"

    def prepare(self) -> None:
        """Rank 0 empties a folder that another config or model made (saying which keys differ) and records
        ``made_by.json``; every rank waits for it, so that all decide what is saved on the same files."""
        rank, _, barrier = context()
        if rank == 0:
            stamp = self.root / "made_by.json"
            saved = list(self.root.glob("*.jsonl")) if self.root.is_dir() else []
            old = None
            if stamp.exists():
                try:
                    old = read_json(stamp)
                except DataError:
                    old = {}
            if saved and old != self.made:
                changed = ([k.removeprefix("config.") if k != "models" else "the model"
                            for k in _differences(old, self.made)] if old else ["no made_by.json"])
                what = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
                print(f"note: {self.root} holds {len(saved)} {self.what}(s) made by another config or model "
                      f"({what}); starting over", file=sys.stderr)
                shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            remove_partial_writes(self.root)  # writes a kill cut short
            if old != self.made or not stamp.exists():
                write_json_atomic(stamp, self.made)
        barrier()  # the others wait until rank 0 is done here

    def load(self, c: int) -> list[dict]:
        """Chunk ``c``'s rows, checked (a copy cut short is not merged as is); :class:`DataError` names the file."""
        path = self.path(c)
        rows = read_jsonl(path)
        got = list(dict.fromkeys(r.get(self.id_field) for r in rows))
        want = [p.id for p in self.chunks[c]]
        if got != want:
            missing = [i for i in want if i not in got]
            raise DataError(f"{path}: holds {len(got)} of the chunk's {len(want)} problems"
                            + (f" (missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                               if missing else " (not the chunk's problems)"))
        return rows

    def saved(self, c: int) -> bool:
        """Is chunk ``c`` saved and whole? A damaged one is named, deleted and done again."""
        if not self.path(c).exists():
            return False
        try:
            self.load(c)
            return True
        except DataError as err:
            print(f"warning: {err}; doing this {self.what} again", file=sys.stderr)
            self.path(c).unlink(missing_ok=True)
            return False

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's unsaved chunks (round-robin: the merged result does not depend on the number of ranks)."""
        return [c for c in range(len(self.chunks)) if c % world == rank and not self.saved(c)]

    def save(self, c: int, rows: list[dict]) -> None:
        write_jsonl_atomic(self.path(c), rows)

    def rows(self) -> list[dict]:
        """Every saved row, chunk by chunk in order."""
        return [r for c in range(len(self.chunks)) for r in self.load(c)]

    def write_timing(self, rank: int, timing: dict) -> None:
        write_json_atomic(self.root / f"timing.rank{rank}.json", timing)

    def timings(self) -> list[dict]:
        return [read_json(f) for f in sorted(self.root.glob("timing.rank*.json"))]
