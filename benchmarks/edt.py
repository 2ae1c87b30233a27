"""EDT vs fixed temperature on the built-in arithmetic task: quality, diversity, overhead.

    python benchmarks/edt.py                         # embedded smollm2-135m, about 15 min on 2 cores
    python benchmarks/edt.py --model runs/NAME/round_1/model --problems 48 --k 8

In one run, for every setting (greedy; fixed T over ``--temperatures``; EDT over ``--edt``
t0:theta pairs, n fixed), k samples per problem with the same seed:

- quality: mean sample accuracy, pass@k, and the step score: the share of a problem's known steps
  a sample gets right, in order, before its first wrong step (graded, so it still moves when the
  final answers are all wrong);
- diversity among the k samples of a problem: distinct-1/2/3 and self-BLEU-4 (whitespace tokens);
- trade-off = harmonic mean of the step score Q and the diversity D = 1 - self-BLEU:
  2QD / (Q + D). It is 0 when either is 0 and rewards neither greedy copies nor fluent noise;
- EDT only: the per-token entropy H seen and the temperature T = t0 * n ** (theta / H) it gave;
- overhead: tokens/s of EDT vs fixed T at the same batch, every row forced to the same length,
  the two interleaved (paired repeats, order alternating), plus the processors' own cost per call.

Writes ``--out``/edt.json and edt.png and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import correct_prefix_fraction, distinct_n, mean_and_se, self_bleu  # noqa: E402

from psr.answers import extract_answer, is_equivalent  # noqa: E402
from psr.files import write_json_atomic  # noqa: E402
from psr.generation import generate  # noqa: E402
from psr.models import load_model  # noqa: E402
from psr.sampling import EDTLogitsProcessor, SamplingConfig  # noqa: E402
from psr.sampling.edt import MIN_TEMPERATURE  # noqa: E402
from psr.steps import render_prompt  # noqa: E402
from psr.tasks.arithmetic import ArithmeticTask  # noqa: E402


class RecordingEDT(EDTLogitsProcessor):
    """EDT that also keeps the entropy of every live row (rows that already ended are padded with
    EOS = pad and are left out). Recording costs one small copy per step."""

    def __init__(self, t0: float, n: float, theta: float, pad_id: int):
        super().__init__(t0, n, theta)
        self.pad_id, self.entropies, self._live = pad_id, [], None

    def __call__(self, input_ids, scores):
        self._live = input_ids[:, -1] != self.pad_id
        return super().__call__(input_ids, scores)

    def entropy(self, scores):
        h = EDTLogitsProcessor.entropy(scores)
        self.entropies.append(h[self._live].cpu())
        return h


@dataclass
class WithProcessor(SamplingConfig):
    """A SamplingConfig whose EDT processor is the given (recording) one."""

    processor: EDTLogitsProcessor | None = None

    def generate_kwargs(self) -> dict:
        return {**super().generate_kwargs(), "logits_processor": [self.processor]}


def label(s: SamplingConfig) -> str:
    if s.policy == "edt":
        return f"EDT t0={s.t0:g} θ={s.theta:g}"
    return f"fixed T={s.temperature:g}" if s.policy == "fixed" else "greedy"


def score_setting(task, problems, samples: list[list[str]]) -> dict:
    """Quality and diversity of k samples per problem (means over problems, with standard errors)."""
    correct = [[is_equivalent(p.gold, extract_answer(s)) for s in outs] for p, outs in zip(problems, samples)]
    step = [statistics.fmean(correct_prefix_fraction(task, p, s) for s in outs) for p, outs in zip(problems, samples)]
    sbleu = [self_bleu(outs) for outs in samples]
    q, q_se = mean_and_se(step)
    d, d_se = mean_and_se([1 - b for b in sbleu])
    return {
        "sample_accuracy": statistics.fmean(statistics.fmean(c) for c in correct),
        "pass@k": statistics.fmean(any(c) for c in correct),
        "step_score": q, "step_score_se": q_se,
        "self_bleu": 1 - d, "diversity": d, "diversity_se": d_se,
        **{f"distinct_{n}": statistics.fmean(distinct_n(outs, n) for outs in samples) for n in (1, 2, 3)},
        "words": statistics.fmean(len(s.split()) for outs in samples for s in outs),
        "tradeoff": 2 * q * d / (q + d) if q + d > 0 else 0.0,
    }


def edt_stats(proc: RecordingEDT) -> dict:
    h = torch.cat(proc.entropies) if proc.entropies else torch.zeros(0)
    t = proc.t0 * torch.where(h > 0, proc._log_n_theta / h, float("-inf")).exp()
    return {"tokens_seen": int(h.numel()), "entropy_median": h.median().item(), "entropy_mean": h.mean().item(),
            "T_mean": t.mean().item(), "T_median": t.median().item(),
            "greedy_share": (t < MIN_TEMPERATURE).float().mean().item(),
            "below_half_t0_share": (t < proc.t0 / 2).float().mean().item()}


def time_processors(batch: int, vocab: int, reps: int = 15) -> dict:
    """ms per call on random [batch, vocab] float32 logits, interleaved, median of ``reps``."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    x, ids = torch.randn(batch, vocab) * 4, torch.zeros(batch, 1, dtype=torch.long)
    procs = {"edt": EDTLogitsProcessor(1.0, 0.8, 0.5), "temperature": TemperatureLogitsWarper(0.7),
             "top_p": TopPLogitsWarper(0.95)}
    times = {k: [] for k in procs}
    for _ in range(reps):
        for name, proc in procs.items():
            start = time.perf_counter()
            for _ in range(5):
                proc(ids, x.clone())
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    return {f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()}


def time_overhead(model, tok, prompts, fixed: SamplingConfig, edt: SamplingConfig, k: int, batch_size: int,
                  new_tokens: int, reps: int, seed: int) -> dict:
    """Generated tokens/s of ``fixed`` and ``edt`` on one batch (``batch_size`` sequences = prompts x k),
    every row forced to exactly ``new_tokens`` tokens; one warm-up each, then ``reps`` interleaved pairs."""
    per_batch = max(1, batch_size // k)
    tok.padding_side = "left"
    enc = tok([prompts[i % len(prompts)] for i in range(per_batch)], add_special_tokens=False,
              return_tensors="pt", padding=True).to(model.device)
    prompt_len = enc["input_ids"].shape[1]

    def run(sampling: SamplingConfig, tokens: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=k,
                                 pad_token_id=tok.pad_token_id, **sampling.generate_kwargs())
        seconds = time.perf_counter() - start
        assert out.shape[1] - prompt_len == tokens
        return out.shape[0] * tokens / seconds

    run(fixed, 8), run(edt, 8)  # warm-up
    pairs = []
    for r in range(reps):
        order = [("fixed", fixed), ("edt", edt)] if r % 2 == 0 else [("edt", edt), ("fixed", fixed)]
        tps = {name: run(s, new_tokens) for name, s in order}
        pairs.append(tps)
        print(f"  overhead rep {r + 1}/{reps}: fixed {tps['fixed']:.1f} tok/s, EDT {tps['edt']:.1f} tok/s", flush=True)
    ratios = [p["edt"] / p["fixed"] for p in pairs]
    return {"batch": per_batch * k, "new_tokens": new_tokens, "reps": reps,
            "fixed": label(fixed), "edt": label(edt),
            "fixed_tokens_per_s": [round(p["fixed"], 2) for p in pairs],
            "edt_tokens_per_s": [round(p["edt"], 2) for p in pairs],
            "ratio_edt_over_fixed_median": round(statistics.median(ratios), 4),
            "ratio_edt_over_fixed_min": round(min(ratios), 4), "ratio_edt_over_fixed_max": round(max(ratios), 4),
            "ms_per_step_fixed": round(1e3 * per_batch * k / statistics.median(p["fixed"] for p in pairs), 2)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    groups = {"fixed": ("tab:blue", "o", "fixed T"), "edt": ("tab:red", "s", "EDT")}

    def curve(ax, ykey, yerr=None, style="-", suffix=""):
        for policy, (color, marker, name) in groups.items():
            pts = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["diversity"])
            if not pts:
                continue
            xs, ys = [r["diversity"] for r in pts], [r[ykey] for r in pts]
            ax.errorbar(xs, ys, xerr=[r["diversity_se"] for r in pts], yerr=[r[yerr] for r in pts] if yerr else None,
                        color=color, marker=marker, linestyle=style, capsize=2, label=name + suffix, alpha=0.9)
            if not suffix:
                for r in pts:
                    text = f"T={r['temperature']:g}" if policy == "fixed" else f"{r['t0']:g}/{r['theta']:g}"
                    ax.annotate(text, (r["diversity"], r[ykey]), textcoords="offset points", xytext=(4, 4),
                                fontsize=8, color=color)
        g = next((r for r in rows if r["policy"] == "greedy"), None)
        if g is not None:
            ax.plot([g["diversity"]], [g[ykey]], marker="*", markersize=12, color="black", linestyle="none",
                    label="greedy" if not suffix else None)

    ax = axes[0]
    curve(ax, "step_score", "step_score_se")
    ax.set_xlabel("diversity = 1 − self-BLEU-4 among the k samples  (→ more diverse)")
    ax.set_ylabel("step score: share of known steps right before the first error")
    ax.set_title("Quality vs diversity (EDT labels: t0/θ)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    curve(ax, "pass@k", style="-", suffix=f" pass@{results['config']['k']}")
    curve(ax, "sample_accuracy", style=":", suffix=" sample accuracy")
    ax.set_xlabel("diversity = 1 − self-BLEU-4")
    ax.set_ylabel("final-answer accuracy")
    c = results["config"]
    ax.set_title(f"Answer accuracy vs diversity ({c['problems']} problems × k={c['k']})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    h = torch.tensor(results.get("entropy_sample", []))
    if h.numel():
        ax.hist(h.clamp_max(6).numpy(), bins=60, color="gray", alpha=0.5, density=True)
        ax.set_ylabel("density of per-token entropy H (gray)")
    ax2 = ax.twinx()
    grid = torch.linspace(0.01, 6, 300)
    for r in (r for r in rows if r["policy"] == "edt"):
        temp = r["t0"] * r["n"] ** (r["theta"] / grid)
        ax2.plot(grid.numpy(), temp.numpy(), label=f"T(H), t0={r['t0']:g} θ={r['theta']:g}")
    ax2.set_ylabel("EDT temperature T = t0 · n^(θ/H)")
    ax2.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("entropy H of the next-token distribution (nats)")
    ax.set_title("What EDT sees: entropy per token and the T it gives")
    o = results["overhead"]
    fig.suptitle(f"EDT vs fixed temperature — {results['config']['model']}, arithmetic task.  Overhead: EDT/fixed "
                 f"tokens/s = {o['ratio_edt_over_fixed_median']:.3f} (median of {o['reps']} pairs, batch {o['batch']})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict) -> str:
    k = results["config"]["k"]
    head = (f"{'setting':<22} {'acc':>6} {'pass@' + str(k):>7} {'step':>6} {'selfBLEU':>9} {'dist-2':>7} "
            f"{'trade':>6} {'words':>6} {'T mean':>7} {'greedy%':>8} {'tok/s':>6}")
    lines = [head]
    for r in results["settings"]:
        t_mean = f"{r['T_mean']:.3f}" if "T_mean" in r else "-"
        greedy = f"{100 * r['greedy_share']:.1f}" if "greedy_share" in r else "-"
        lines.append(f"{r['label']:<22} {r['sample_accuracy']:>6.3f} {r['pass@k']:>7.3f} {r['step_score']:>6.3f} "
                     f"{r['self_bleu']:>9.3f} {r['distinct_2']:>7.3f} {r['tradeoff']:>6.3f} {r['words']:>6.1f} "
                     f"{t_mean:>7} {greedy:>8} {r['tokens_per_s']:>6.1f}")
    o, p = results["overhead"], results["processor_ms"]
    lines.append(f"overhead ({o['fixed']} vs {o['edt']}, batch {o['batch']}, {o['new_tokens']} tokens, "
                 f"{o['reps']} pairs): "
                 f"EDT/fixed tokens/s median {o['ratio_edt_over_fixed_median']:.3f} "
                 f"(min {o['ratio_edt_over_fixed_min']:.3f}, max {o['ratio_edt_over_fixed_max']:.3f}); "
                 f"{o['ms_per_step_fixed']:.0f} ms per decoding step")
    lines.append(f"per call on [{o['batch']}, vocab] logits: EDT {p['edt_ms']:.2f} ms, "
                 f"temperature {p['temperature_ms']:.2f} ms, top-p {p['top_p_ms']:.2f} ms")
    return "\n".join(lines)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def pairs(text: str) -> list[tuple[float, float]]:
    return [tuple(float(v) for v in x.split(":")) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="built-in name, local directory (e.g. an M1 model) or hub id")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    ap.add_argument("--temperatures", type=floats, default=floats("0.5,0.8,1.1"), help="fixed T sweep")
    ap.add_argument("--edt", type=pairs, default=pairs("0.8:0.5,1.1:0.5,1.1:1.5,1.4:1.5"), help="t0:theta pairs")
    ap.add_argument("--n", type=float, default=0.8, help="EDT base (paper: 0.8)")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--timing-reps", type=int, default=3, help="interleaved EDT/fixed pairs for tokens/s")
    ap.add_argument("--timing-tokens", type=int, default=48, help="tokens per row in the tokens/s runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "edt"))
    args = ap.parse_args(argv)

    started = time.perf_counter()
    model, tok = load_model(args.model)
    task = ArithmeticTask()
    problems = task.problems("test", args.problems, seed=args.seed)
    prompts = [render_prompt(tok, p.question) for p in problems]
    print(f"{args.model}: {len(problems)} problems x k={args.k}, max_new_tokens={args.max_new_tokens}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)

    fixed = [SamplingConfig(policy="fixed", temperature=t, top_p=args.top_p) for t in args.temperatures]
    edt = [SamplingConfig(policy="edt", t0=t0, theta=theta, n=args.n, top_p=args.top_p) for t0, theta in args.edt]
    # Interleave the two policies so that a change in machine load hits both alike.
    order = [SamplingConfig(policy="greedy")] + [s for pair in zip(fixed, edt) for s in pair]
    order += fixed[len(edt):] + edt[len(fixed):]

    settings, entropy_sample = [], []
    for s in order:
        k = 1 if s.policy == "greedy" else args.k
        sampling, recorder = s, None
        if s.policy == "edt":
            recorder = RecordingEDT(s.t0, s.n, s.theta, tok.pad_token_id)
            sampling = WithProcessor(**vars(s), processor=recorder)
        start = time.perf_counter()
        outs = generate(model, tok, prompts, sampling, args.max_new_tokens, args.batch_size, num_samples=k,
                        seed=args.seed, progress=False)
        seconds = time.perf_counter() - start
        if k == 1:
            outs = [o * args.k for o in outs]  # greedy: k identical samples
        n_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for row in outs for o in row[:k])
        row = {"label": label(s), "policy": s.policy, "temperature": s.temperature, "t0": s.t0, "n": s.n,
               "theta": s.theta, "top_p": s.top_p, "seconds": round(seconds, 1),
               "tokens_per_s": n_tokens / seconds, **score_setting(task, problems, outs)}
        if recorder is not None:
            row.update(edt_stats(recorder))
            if not entropy_sample:
                h = torch.cat(recorder.entropies)
                order = torch.randperm(h.numel(), generator=torch.Generator().manual_seed(0))
                entropy_sample = h[order[:5000]].tolist()
        row["examples"] = outs[0][:2]
        settings.append(row)
        print(f"  {row['label']:<22} step {row['step_score']:.3f}  acc {row['sample_accuracy']:.3f}  "
              f"self-BLEU {row['self_bleu']:.3f}  {seconds:.0f} s", flush=True)

    # Overhead: one EDT setting against fixed T = its t0 (the cost of neither depends on T).
    timed_edt = edt[min(1, len(edt) - 1)]
    timed_fixed = SamplingConfig(policy="fixed", temperature=timed_edt.t0, top_p=args.top_p)
    overhead = time_overhead(model, tok, prompts, timed_fixed, timed_edt, args.k, args.batch_size, args.timing_tokens,
                             args.timing_reps, args.seed)
    results = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("temperatures", "edt")},
                   "temperatures": args.temperatures, "edt": [list(p) for p in args.edt],
                   "threads": torch.get_num_threads(), "device": str(model.device)},
        "definitions": {
            "step_score": "per sample: share of the problem's known steps right, in order, before the first wrong "
                          "step (unverifiable steps skipped); mean over samples, then problems",
            "diversity": "1 - self-BLEU-4 among the k samples of a problem (whitespace tokens, +1 smoothing n>1), "
                         "mean over problems",
            "distinct_n": "distinct n-grams / all n-grams pooled over the k samples of a problem, mean over problems",
            "tradeoff": "harmonic mean of step_score Q and diversity D: 2QD/(Q+D)",
            "tokens_per_s (settings)": "tokens of the returned texts / wall time of the setting (lengths differ)",
            "overhead": "tokens/s with every row forced to the same length, EDT and fixed interleaved",
        },
        "settings": settings,
        "overhead": overhead,
        "processor_ms": time_processors(overhead["batch"], model.config.vocab_size),
        "entropy_sample": [round(x, 4) for x in entropy_sample],
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "edt.json", results)
    plot(results, out / "edt.png")
    print(print_table(results))
    print(f"wrote {out / 'edt.json'} and {out / 'edt.png'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
