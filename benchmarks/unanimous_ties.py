"""How many of a run's tie-rule rollbacks come from candidates that are all the same text (nothing to judge), and
how many problems gave up on them: per arm and round, from the run's ``search.jsonl`` files. This is what
``search.keep_unanimous`` changes (docs/design.md).

    python benchmarks/unanimous_ties.py runs/v4_s0_lastans --out results/experiment_v4/s0/unanimous_ties.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from psr.inflight import unanimous


def count(traces: list[dict]) -> dict:
    events = [e for t in traces for e in t["events"]]
    alike = [e for e in events if e.get("tie") and unanimous(e["candidates"])]
    gave_up = [t for t in traces if t["status"] == "gave_up"]
    return {"problems": len(traces), "judged_steps": len(events), "ties": sum(bool(e.get("tie")) for e in events),
            "unanimous_ties": len(alike),
            "unanimous_ties_all_right": sum(all(r is True for r in e["candidate_correct"]) for e in alike),
            "gave_up": len(gave_up),
            "gave_up_on_unanimous": sum(unanimous(t["events"][-1]["candidates"]) for t in gave_up if t["events"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--out")
    args = ap.parse_args()
    out = {"command": "python benchmarks/unanimous_ties.py " + " ".join(sys.argv[1:]), "rounds": {}}
    for f in sorted(Path(args.run).glob("*/round_*/search.jsonl")):
        stage = str(f.parent.relative_to(args.run))
        out["rounds"][stage] = count([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
        print(stage, out["rounds"][stage])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
