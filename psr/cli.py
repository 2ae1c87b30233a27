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


def cmd_eval(args) -> int:
    from psr.evaluate import EvalConfig, evaluate, format_table

    cfg = _config_from(EvalConfig, args, {
        "model": args.model, "task.name": args.task, "task.data": args.data, "limit": args.limit,
        "offset": args.offset, "batch_size": args.batch_size, "samples": args.samples,
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "out": args.out, "dtype": args.dtype,
    })
    result = evaluate(cfg)
    print(format_table(result))
    if cfg.out:
        print(f"wrote {cfg.out}")
    return 0


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
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(func=cmd_eval)
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
