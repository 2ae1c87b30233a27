"""Did SFT teach the verdict? The share of right verdicts in each training batch of an EFT-only init run,
read from its logged token accuracy (``train_log.json`` beside the saved model), plotted per step.

In a logits-mode EFT row the completion is ``Verdict: [[X]]<|im_end|>``: ``--tokens`` tokens of which only
the verdict is hard, so once the rest is learned a batch's token accuracy is ``1 - (1 - v) / tokens`` for a
verdict accuracy ``v`` (0.929 = 13/14 at ``tokens`` 7 is v = 0.5: chance).

    python benchmarks/verdict_curve.py runs/m1_search_ift3/model --out results/eft_search/verdict_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from psr.files import write_json_atomic


def verdict_accuracy(log_history: list[dict], tokens: int) -> list[tuple[int, float, float]]:
    """(step, epoch, verdict accuracy) for each logged training step."""
    return [(r["step"], r["epoch"], max(0.0, 1 - (1 - r["mean_token_accuracy"]) * tokens))
            for r in log_history if "mean_token_accuracy" in r and "step" in r]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories of EFT-only init runs (with train_log.json)")
    ap.add_argument("--tokens", type=int, default=7, help="completion tokens per EFT row")
    ap.add_argument("--window", type=int, default=8, help="steps in the running mean")
    ap.add_argument("--out", default="results/eft_search/verdict_curve.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    summary = {}
    for m in args.models:
        log = json.loads((Path(m) / "train_log.json").read_text())
        curve = verdict_accuracy(log["log_history"], args.tokens)
        steps, acc = [c[0] for c in curve], [c[2] for c in curve]
        mean = [sum(acc[max(0, i - args.window + 1): i + 1]) / len(acc[max(0, i - args.window + 1): i + 1])
                for i in range(len(acc))]
        ax.plot(steps, acc, alpha=0.25)
        ax.plot(steps, mean, label=f"{m} (mean of {args.window})")
        by_epoch = {}
        for _, epoch, a in curve:
            by_epoch.setdefault(min(int(epoch - 1e-9), 99) + 1, []).append(a)
        summary[m] = {f"epoch {e}": round(sum(v) / len(v), 3) for e, v in sorted(by_epoch.items())}
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("verdicts right in the batch")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    write_json_atomic(Path(args.out).with_suffix(".json"), summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
