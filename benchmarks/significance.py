"""Holm's correction applied to the difference table of a report written before ``psr report`` applied it.

``python benchmarks/significance.py results/experiment/report.md --out results/experiment/significance.json``
reads the table "each model against M1" (columns model, benchmark, n, accuracy, vs M1, 95% interval, z),
computes each comparison's two-sided p from its z and Holm's adjusted p over all comparisons with a z
(psr.report.holm, as reports written now do), and says which stay significant at a family-wise 5%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from psr.report import holm, two_sided_p


def read_differences(report: str) -> list[dict]:
    rows, table = [], False
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["model", "benchmark"]:
            table = True
            continue
        if table and line.startswith("|---"):
            continue
        if table and line.startswith("|"):
            z = None if cells[6] in ("—", "") else float(cells[6])
            rows.append({"model": cells[0], "benchmark": cells[1], "n": int(cells[2]), "accuracy": float(cells[3]),
                         "difference": cells[4], "interval": cells[5], "z": z})
        elif table:
            break
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report")
    ap.add_argument("--out")
    ap.add_argument("--alpha", type=float, default=0.05)
    args = ap.parse_args(argv)
    rows = read_differences(Path(args.report).read_text())
    tested = [r for r in rows if r["z"] is not None]
    for r, adj in zip(tested, holm([two_sided_p(r["z"]) for r in tested])):
        r["p"], r["holm_p"] = two_sided_p(r["z"]), adj
        r["significant_uncorrected_abs_z_2"] = abs(r["z"]) >= 2
        r["significant_holm"] = adj < args.alpha
    out = {"command": "python benchmarks/significance.py " + " ".join(argv if argv is not None else []),
           "report": args.report, "comparisons_with_z": len(tested), "alpha": args.alpha, "rows": rows}
    for r in tested:
        print(f"{r['model']:<10} {r['benchmark']:<11} z {r['z']:6.2f}  p {r['p']:.3g}  Holm p {r['holm_p']:.3g}  "
              f"{'significant' if r['significant_holm'] else '-'}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
