"""The ``psr`` command: one subcommand per stage. ``psr <command> --help`` for options."""

from __future__ import annotations

import argparse
import os
import sys

from psr.config import ConfigError, from_dict, load_yaml


def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _config_from(cls, args, mapping: dict) -> object:
    """A stage config from ``--config`` (if given) with command-line values on top."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for key, value in mapping.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, data)


def _sampling_flags(args) -> dict:
    """``sampling.*`` overrides from --policy/--temperature/--top-p/--t0/--n/--theta. Without
    --policy the flags imply it (--t0/--n/--theta: edt, --temperature: fixed), unless the config
    file names one: a partial ``sampling`` block would otherwise fall back to policy greedy."""
    values = {"temperature": args.temperature, "top_p": args.top_p, "t0": args.t0, "n": args.n, "theta": args.theta}
    policy = args.policy
    has_file_policy = bool(getattr(args, "config", None)) and "policy" in (load_yaml(args.config).get("sampling") or {})
    if policy is None and not has_file_policy and any(v is not None for v in values.values()):
        policy = "edt" if any(values[k] is not None for k in ("t0", "n", "theta")) else "fixed"
    return {f"sampling.{k}": v for k, v in {"policy": policy, **values}.items()}


def cmd_eval(args) -> int:
    from psr.evaluate import EvalConfig, evaluate, format_table

    cfg = _config_from(EvalConfig, args, {
        "model": args.model, "task.name": args.task, "task.data": args.data, "limit": args.limit,
        "offset": args.offset, "batch_size": args.batch_size, "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "out": args.out, "dtype": args.dtype,
        **_sampling_flags(args),
    })
    result = evaluate(cfg)
    print(format_table(result))
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0


def cmd_search(args) -> int:
    from psr.pairs import format_stats
    from psr.search import SearchConfig, run_search

    cfg = _config_from(SearchConfig, args, {
        "model": args.model, "task.name": args.task, "task.data": args.data, "limit": args.limit,
        "out": args.out, "method": args.method, "width": args.width, "seed": args.seed,
        "judge.mode": args.judge_mode, "sampling.policy": args.policy,
    })
    stats = run_search(cfg)
    if stats:  # rank 0 only
        print(format_stats(stats))
        print(f"wrote {cfg.out}/search.jsonl and {cfg.out}/pairs.jsonl")
    return 0


def cmd_judge_eval(args) -> int:
    from psr.judge_eval import JudgeEvalConfig, format_judge_eval, judge_eval

    cfg = _config_from(JudgeEvalConfig, args, {
        "model": args.model, "task.name": args.task, "pairs_file": args.pairs, "limit": args.limit,
        "judge.mode": args.mode, "judge.aggregation": args.aggregation, "seed": args.seed, "out": args.out,
    })
    print(format_judge_eval(judge_eval(cfg)))
    return 0


def _print_train_result(result: dict, out: str, what: str) -> None:
    t, final = result["timing"], result["final"]
    shown = {k: round(v, 4) for k, v in final.items() if k in ("loss", "rewards/margins", "rewards/accuracies", "mean_token_accuracy")}
    print(f"{what}: {t.get('steps', 0)} steps, {t.get('median_s_per_step', float('nan'))} s/step, "
          f"peak {result['peak_rss_mb']:.0f} MB; last log {shown}")
    print(f"wrote {out} (load it with: psr eval --model {out})")


def cmd_init(args) -> int:
    from psr.train.common import world_size
    from psr.train.sft import InitConfig, run_init

    cfg = _config_from(InitConfig, args, {
        "model": args.model, "out": args.out, "task.name": args.task, "task.data": args.data,
        "ift_data": args.ift_data, "eft_data": args.eft_data, "ift_examples": args.ift_examples,
        "eft_examples": args.eft_examples, "eft_justification": args.eft_justification, "lora": args.lora,
        "epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
    })
    result = run_init(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_train_result(result, cfg.out, f"init (IFT {result['examples']['ift']} + EFT {result['examples']['eft']}, "
                                             f"{world_size()} process(es))")
    return 0


def cmd_train(args) -> int:
    from psr.train.common import world_size
    from psr.train.step_dpo import StepDPOConfig, run_train

    cfg = _config_from(StepDPOConfig, args, {
        "model": args.model, "pairs": args.pairs, "out": args.out, "ref_model": args.ref_model, "beta": args.beta,
        "lora": args.lora, "epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "precompute_ref_log_probs": args.precompute_ref_log_probs, "seed": args.seed,
    })
    result = run_train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_train_result(result, cfg.out, f"step-DPO on {result['pairs']} pairs ({world_size()} process(es))")
    return 0


def _training_flags(p) -> None:
    p.add_argument("--model", help="starting model: hub id, local directory, smollm2-135m or tiny-random")
    p.add_argument("--out", help="the model directory to write (psr eval --model DIR loads it)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None, help="LoRA instead of full fine-tuning")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--learning-rate", "--lr", type=float)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--seed", type=int)


def cmd_iterate(args) -> int:
    from psr.rounds import run_from_args

    run_from_args(args)
    return 0


def cmd_report(args) -> int:
    from psr.report import main as report_main

    return report_main([args.run])


def add_iterate_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", required=True, help="run YAML (see recipes/)")
    ap.add_argument("--run", help="run folder (default runs/<name>)")
    ap.add_argument("--restart-from", metavar="STAGE", help="redo from this stage on, e.g. psr/round_1/search")
    ap.add_argument("--stop-after", choices=["init", "search", "train", "eval"],
                    help="stop once the next unfinished stage of this kind is done (for make targets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="step-by-step math accuracy of a model (greedy; maj@k with --samples)")
    p.add_argument("--config", help="YAML file with EvalConfig fields (command-line values win)")
    p.add_argument("--model", help="hub id, local directory, smollm2-135m or tiny-random")
    p.add_argument("--task", choices=["arithmetic", "gsm8k", "math"])
    p.add_argument("--data", help="gsm8k/math: JSONL path (question/answer) or hub id")
    p.add_argument("--limit", type=int)
    p.add_argument("--offset", type=int, help="gsm8k/math: skip this many rows first")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--samples", type=int, help="k samples per problem for maj@k and pass@k")
    p.add_argument("--policy", choices=["fixed", "edt"], help="sampling policy of the k samples (default fixed, T=0.7)")
    p.add_argument("--temperature", type=float, help="fixed: the temperature")
    p.add_argument("--top-p", type=float, help="fixed and edt: nucleus after the temperature")
    p.add_argument("--t0", type=float, help="edt: upper bound of T = t0 * n ** (theta / H)")
    p.add_argument("--n", type=float, help="edt: base, 0 < n < 1")
    p.add_argument("--theta", type=float, help="edt: strength")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="step-wise search with the model as its own judge -> search.jsonl + pairs.jsonl")
    p.add_argument("--config", help="YAML file with SearchConfig fields (command-line values win)")
    p.add_argument("--model")
    p.add_argument("--task", choices=["arithmetic", "gsm8k", "math"])
    p.add_argument("--data", help="gsm8k/math: JSONL path or hub id")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", help="output folder (search.jsonl, pairs.jsonl, pair_stats.json)")
    p.add_argument("--method", choices=["psr", "srlm"], help="psr: step-wise (default); srlm: outcome-based baseline")
    p.add_argument("--width", type=int, help="candidates per step (default 6)")
    p.add_argument("--judge-mode", choices=["logits", "generate"])
    p.add_argument("--policy", choices=["edt", "fixed", "greedy"], help="sampling policy of candidate steps")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("judge-eval", help="accuracy of the model as a pairwise step judge on held-out pairs")
    p.add_argument("--config")
    p.add_argument("--model")
    p.add_argument("--task", choices=["arithmetic"])
    p.add_argument("--pairs", help="labelled pairs JSONL (chosen = the right step) instead of built-in pairs")
    p.add_argument("--limit", type=int)
    p.add_argument("--mode", choices=["logits", "generate"])
    p.add_argument("--aggregation", choices=["agree", "sum"])
    p.add_argument("--seed", type=int)
    p.add_argument("--out")
    p.set_defaults(func=cmd_judge_eval)

    p = sub.add_parser("iterate", help="the whole loop: init -> rounds of search, train, eval -> report (resumable)")
    add_iterate_arguments(p)
    p.set_defaults(func=cmd_iterate)

    p = sub.add_parser("report", help="write report.md and plots for a run folder")
    p.add_argument("run", help="run folder, e.g. runs/demo")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("init", help="M0 -> M1: SFT on IFT (step-formatted solutions) + EFT (step-judge) data")
    p.add_argument("--config", help="YAML file with InitConfig fields (command-line values win)")
    _training_flags(p)
    p.add_argument("--task", choices=["arithmetic", "gsm8k", "math"])
    p.add_argument("--data", help="gsm8k: JSONL path or hub id whose reference solutions become IFT data")
    p.add_argument("--ift-data", help="IFT JSONL: question/answer (GSM8K), question/steps or prompt/completion rows")
    p.add_argument("--eft-data", help="EFT JSONL: question, previous_steps, step_a, step_b, verdict rows")
    p.add_argument("--ift-examples", type=int)
    p.add_argument("--eft-examples", type=int)
    p.add_argument("--eft-justification", action=argparse.BooleanOptionalAction, default=None,
                   help="EFT replies with a short justification before the verdict")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="one round of step-wise DPO on a pairs.jsonl")
    p.add_argument("--config", help="YAML file with StepDPOConfig fields (command-line values win)")
    _training_flags(p)
    p.add_argument("--pairs", help="the round's pairs.jsonl (prompt, chosen, rejected + metadata)")
    p.add_argument("--ref-model", help="reference policy (default: the starting model)")
    p.add_argument("--beta", type=float)
    p.add_argument("--precompute-ref-log-probs", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    from psr.models import ModelLoadError
    from psr.tasks import DataError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, DataError) as err:
        print(f"psr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
