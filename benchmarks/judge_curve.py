"""The self-judge's learning curve, and a judge that reasons (issue 33, steps 1-2).

Each arm is an M1 made as ``psr iterate``'s init makes it (M0 + SFT on the IFT rows and the IFT pass's own
search-EFT rows, exactly labelled), with ``scale`` times the recipe's searched problems and pairs, and EFT rows
of one ``kind``: ``verdict`` (the reply is just "Verdict: [[X]]", the paper's logits judge) or ``recompute``
(``justification_kind: recompute``: the next step and each candidate recomputed, then the verdict; a
generate-mode judge). Every M1 is then measured on its own candidates of held-out problems with
``benchmarks/self_judge.py``: kept right vs random at mixed steps, for its own judge mode and for the
policy's likelihood beside it.

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/judge_curve.py \\
        --recipe recipes/smollm2/iterate/config_experiment_v4.yaml --ift-pass runs/v4_s0/init/ift_pass \\
        --reuse-search runs/v4_s0/init/eft_search/eft.jsonl.chunks --reuse-m1 runs/v4_s0/init/model \\
        --scales 1 4 --kinds verdict recompute --out runs/judge_curve

Resumable: a search resumes by chunks, a trained M1 (``train_log.json``) and a measure (its JSON) are reused.
Summary: ``<out>/summary.json`` and ``summary.png`` (copy them to results/self_judge/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psr.build_eft import run_build_eft  # noqa: E402
from psr.config import load_config  # noqa: E402
from psr.models import model_options  # noqa: E402
from psr.rounds import RunConfig, init_config  # noqa: E402
from psr.train.sft import _train, eft_search_offset  # noqa: E402


def build_rows(icfg, ift_pass: str, scale: int, kind: str, out: Path, reuse: str | None = None) -> dict:
    """The EFT rows of one arm: the IFT pass's search of ``scale`` x the recipe's problems, pairs capped at
    ``scale`` x its max_pairs; both kinds read the same search (its chunks are shared)."""
    base = icfg.eft_search
    rows = out / f"x{scale}" / f"eft_{kind}.jsonl"
    chunks = out / f"x{scale}" / "eft.jsonl.chunks"
    chunks.parent.mkdir(parents=True, exist_ok=True)
    if reuse and not chunks.exists():  # the recipe's own init search (same settings: its chunks are taken)
        chunks.symlink_to(Path(reuse).resolve())
    chunks.mkdir(exist_ok=True)
    link = rows.parent / f"{rows.name}.chunks"
    if not link.exists():
        link.symlink_to(chunks.name)
    ecfg = dataclasses.replace(base, model=ift_pass, task=icfg.task, seed=icfg.data_seed,
                               offset=eft_search_offset(icfg), template=icfg.judge_template, out=str(rows),
                               limit=base.limit * scale,
                               max_pairs=None if base.max_pairs is None else base.max_pairs * scale,
                               justification=kind == "recompute", justification_kind="recompute",
                               **dataclasses.asdict(model_options(icfg)))
    return run_build_eft(ecfg)


def train_m1(icfg, rows: Path, kind: str, model_dir: Path) -> dict:
    log = model_dir / "train_log.json"
    if log.exists():
        return json.loads(log.read_text())
    final = dataclasses.replace(icfg, eft_source="file", eft_data=str(rows), eft_examples=None,
                                eft_justification=kind == "recompute", out=str(model_dir))
    return _train(final)


def train_end(log: dict) -> dict:
    """The fit on its own training rows as training ended: loss and token accuracy, mean of the last 10 logs."""
    out = {}
    for key in ("loss", "mean_token_accuracy"):
        tail = [h[key] for h in log.get("log_history", []) if key in h][-10:]
        out[key] = round(sum(tail) / len(tail), 4) if tail else None
    return out


def measure(model_dir: Path, kind: str, args, out: Path) -> dict:
    if not out.exists():
        modes = ["generate", "likelihood"] if kind == "recompute" else ["logits0", "likelihood"]
        cmd = [sys.executable, "benchmarks/self_judge.py", "--model", str(model_dir), "--problems", str(args.problems),
               "--width", str(args.width), "--backend", args.backend, "--modes", *modes, "--out", str(out),
               "--task", *map(str, args.task)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def plot(summary: dict, path: Path) -> None:
    """Kept right at mixed steps per arm and judge mode (95% Wilson intervals), against a random pick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{name}\n{mode.split(' (')[0]}", v) for name, arm in summary["arms"].items()
            for mode, v in arm["modes"].items() if v.get("kept_right") is not None]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4))
    for x, (label, v) in enumerate(bars):
        lo, hi = v["kept_right_interval"]
        ax.bar(x, v["kept_right"], color="tab:blue" if "likelihood" in label else "tab:orange")
        ax.errorbar(x, v["kept_right"], yerr=[[v["kept_right"] - lo], [hi - v["kept_right"]]], color="black",
                    capsize=3)
        ax.plot([x - 0.4, x + 0.4], [v["random_right"]] * 2, color="grey", linestyle="--")
    ax.axhline(0.75, color="green", linewidth=0.8, label="goal 0.75")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("kept right at mixed steps")
    ax.set_ylim(0, 1)
    ax.set_title("self-judges on their own candidates (dashed: a random pick)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/smollm2/iterate/config_experiment_v4.yaml")
    ap.add_argument("--ift-pass", required=True, help="the recipe's IFT pass (runs/<run>/init/ift_pass)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reuse-search", help="scale 1: the recipe's init search chunks "
                    "(runs/<run>/init/eft_search/eft.jsonl.chunks), instead of searching again")
    ap.add_argument("--reuse-m1", help="verdict at scale 1: the recipe's M1 (runs/<run>/init/model), the same arm")
    ap.add_argument("--kinds", nargs="+", default=["verdict", "recompute"], choices=["verdict", "recompute"])
    ap.add_argument("--problems", type=int, default=60, help="held-out problems the judges are measured on")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--task", type=int, nargs=3, default=[2, 4, 20])
    ap.add_argument("--backend", choices=["hf", "vllm"], default="vllm")
    ap.add_argument("--out", default="runs/judge_curve")
    args = ap.parse_args()
    out = Path(args.out)
    summary = {"command": "python benchmarks/judge_curve.py " + " ".join(sys.argv[1:]), "arms": {}}
    for scale in args.scales:
        for kind in args.kinds:
            name = f"{kind}_x{scale}"
            icfg = init_config(load_config(RunConfig, args.recipe), out / name / "model")
            stats = build_rows(icfg, args.ift_pass, scale, kind, out, args.reuse_search if scale == 1 else None)
            if scale == 1 and kind == "verdict" and args.reuse_m1 and not (out / name / "model").exists():
                (out / name).mkdir(parents=True, exist_ok=True)
                (out / name / "model").symlink_to(Path(args.reuse_m1).resolve())
            log = train_m1(icfg, out / f"x{scale}" / f"eft_{kind}.jsonl", kind, out / name / "model")
            result = measure(out / name / "model", kind, args, out / name / "self_judge.json")
            summary["arms"][name] = {
                "scale": scale, "kind": kind, "eft_pairs": stats["pairs"], "eft_rows": stats["rows"],
                "searched_problems": stats["problems"], "train_examples": log.get("examples"),
                "train_end": train_end(log),
                "modes": {m: {k: v[k] for k in ("kept_right", "kept_right_interval", "random_right", "gain_z",
                                                "ties", "mixed_steps", "unparseable", "reasoning") if k in v}
                          for m, v in result["modes"].items()}}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot(summary, out / "summary.png")
            print(name, json.dumps(summary["arms"][name]["modes"]), flush=True)


if __name__ == "__main__":
    main()
