"""The ``psr`` command: one subcommand per stage, its flags generated from the stage's config dataclass.

Every field is a flag named by its dotted path, with the comment beside the field as its help:
``psr search --width 6 --sampling.t0 0.9``, ``psr iterate --config R --train.beta 0.2``. Values are
read as YAML (``--methods "[psr, srlm]"``, ``--limit null``) and go on top of the ``--config`` file,
checked by the same strict loader (``psr.config.load_config``). A mapping field also takes one key
at a time (``--train.trl.optim adafactor``). ``psr <command> --help`` shows the command's common
fields, grouped; ``--help PREFIX`` the fields under a block or matching a word (``--help train``,
``--help lora``); ``--help-all`` every field. Every error is one line (``psr <command>: error: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
import shutil
import sys
import textwrap
import types
import typing

import yaml

from psr.config import ConfigError, field_docs, load_config

# command -> (its config class, one line of help, short aliases users rely on: flag -> dotted field)
COMMANDS = {
    "eval": ("psr.evaluate:EvalConfig", "step-by-step math accuracy of a model (greedy; maj@k with --samples)",
             {"--policy": "sampling.policy"}),
    "search": ("psr.search:SearchConfig",
               "step-wise search with the model as its own judge -> search.jsonl + pairs.jsonl",
               {"--judge-mode": "judge.mode", "--policy": "sampling.policy"}),
    "judge-eval": ("psr.judge_eval:JudgeEvalConfig", "accuracy of the model as a pairwise step judge on held-out pairs",
                   {"--pairs": "pairs_file", "--mode": "judge.mode", "--aggregation": "judge.aggregation"}),
    "init": ("psr.train.sft:InitConfig", "M0 -> M1: SFT on IFT (step-formatted solutions) + EFT (step-judge) data",
             {"--lr": "learning_rate"}),
    "train": ("psr.train.step_dpo:StepDPOConfig", "one round of step-wise DPO on a pairs.jsonl",
              {"--lr": "learning_rate"}),
    "build-ift": ("psr.build_ift:BuildIFTConfig",
                  "IFT data: reference solutions cut into steps (GSM8K, MATH, built-in)", {}),
    "build-eft": ("psr.build_eft:BuildEFTConfig",
                  "EFT data: the model's own candidate steps from a step-by-step search, annotated and paired", {}),
    "iterate": ("psr.rounds:RunConfig",
                "the whole loop: init -> rounds of search, train, eval -> report (resumable)", {}),
}
# every command whose config has the field
ALIASES = {"--task": "task.name", "--data": "task.data", "--backend": "generation.backend"}
DEST = "cfg:"  # argparse dest prefix of config fields
_MODEL = ["model", "revision", "trust_remote_code", "attn_implementation", "dtype"]
# What `psr <command> --help` shows: the fields most runs set, grouped (every field: --help-all).
COMMON = {
    "eval": {"model": _MODEL, "data": ["task.name", "task.data", "split", "limit", "offset"],
             "decoding": ["samples", "max_new_tokens", "batch_size", "generation.backend"], "output": ["out", "seed"]},
    "search": {"model": _MODEL, "data": ["task.name", "task.data", "limit", "offset"],
               "search": ["method", "width", "max_steps", "judge.mode", "judge.aggregation", "sampling.policy",
                          "generation.backend"], "output": ["out", "seed", "round"]},
    "judge-eval": {"model": _MODEL, "data": ["pairs_file", "task.name", "limit"],
                   "judge": ["judge.mode", "judge.aggregation", "generation.backend"], "output": ["out", "seed"]},
    "init": {"model": ["model", *_MODEL[1:4], "out"],
             "data": ["task.name", "task.data", "ift_data", "eft_data", "ift_examples", "eft_examples"],
             "training": ["learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "max_length",
                          "lora", "dtype", "seed"], "logging and TRL": ["report_to", "trl"]},
    "train": {"model": ["model", *_MODEL[1:4], "ref_model", "out"], "data": ["pairs"],
              "step-DPO": ["beta", "loss_type", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps",
                           "max_length", "lora", "dtype", "seed"], "logging and TRL": ["report_to", "trl"]},
    "build-ift": {"data": ["task.name", "task.data", "limit", "offset", "split", "seed"],
                  "cutting": ["max_steps", "max_step_chars"], "output": ["out"]},
    "build-eft": {"model": _MODEL, "data": ["task.name", "task.data", "limit", "offset"],
                  "annotation": ["annotator", "rollouts", "annotator_model", "width", "max_pairs",
                                 "generation.backend"],
                  "output": ["out", "seed"]},
    "iterate": {"run": ["name", "model", "revision", "trust_remote_code", "attn_implementation", "m1", "rounds",
                        "methods", "problems_per_round", "seed"],
                "data": ["task.name", "task.data"], "evaluation": ["benchmarks", "judge_eval_limit", "eval_m0"],
                "engine, trackers, hub": ["generation.backend", "report_to", "hub.push"]},
}
# what to do after Ctrl-C, per command (what the command keeps of its work)
RESUME = {"iterate": "finished stages are kept: run the same command again to resume at the first unfinished "
                     "one",
          "search": "finished chunks are kept: run the same command again to resume from them",
          "eval": "finished chunks are kept: run the same command again to resume from them",
          "build-eft": "finished chunks are kept: run the same command again to resume from them",
          "init": "checkpoints (save_steps) are kept: run the same command again to resume from the last one",
          "train": "checkpoints (save_steps) are kept: run the same command again to resume from the last one"}


class Parser(argparse.ArgumentParser):
    """argparse, with every error one line naming the command (no usage block of every subcommand)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """``--batch_size, --batch-size INT`` (the value's name once, not after every alias)."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        meta = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {meta}"


def _field_actions(parser) -> dict[str, argparse.Action]:
    return {a.dest[len(DEST):]: a for a in parser._actions if a.dest.startswith(DEST)}


def _blocks(parser) -> list[str]:
    """``task (6 fields)``, ... for the nested blocks of a command, for the help's last lines."""
    names = [name for name in _field_actions(parser) if "." in name]
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    return [f"{block} ({n})" for block, n in counts.items()]


def _one_line(action, width: int) -> str:
    """``  --rounds INT          rounds of search -> ... (default: 2)`` cut to ``width``: the common view."""
    flags = [o for o in action.option_strings if "-" not in o.lstrip("-") or o.count("-") == 2 and "." not in o
             and o.replace("-", "_") not in action.option_strings] or action.option_strings[:1]
    flags = [o for o in flags if not o.startswith("--no-")]
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        lead = " / ".join(flags) + (" / --no-" + flags[0][2:] if isinstance(action, argparse.BooleanOptionalAction)
                                    else "")
    else:
        meta = action.metavar or ("{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper())
        lead = f"{', '.join(flags)} {meta if len(meta) < 24 else 'CHOICE'}"
    doc, _, default = (action.help or "").replace("%%", "%").partition(" (default: ")
    default = default.partition(")")[0]
    default = f" (default: {default if len(default) <= 24 else default[:21] + '...'})" if default else ""
    room = width - 34 - len(default)
    doc = doc if len(doc) <= room else doc[: max(room - 3, 10)].rstrip() + "..."
    return f"  {lead:<31} {doc}{default}" if len(lead) <= 31 else f"  {lead}\n  {'':<31} {doc}{default}"


def format_help(parser, command: str, which: str | None) -> str:
    """``which``: None = the common fields, grouped, one line each; "" = every field; else the fields under
    the block ``which`` (``train`` -> ``train.*``) or, when no block has that name, the fields whose name
    holds it."""
    fields = _field_actions(parser)
    own = [a for a in parser._actions if not a.dest.startswith(DEST)]  # --config, --run, --help, ...
    if which is None:
        width = min(shutil.get_terminal_size((100, 40)).columns, 120)
        lines = [parser.format_usage().strip(), "", *textwrap.wrap(parser.description, width), "", "options:"]
        lines += [_one_line(a, width) for a in own]
        for title, names in COMMON[command].items():
            lines += ["", f"{title}:"] + [_one_line(fields[n], width) for n in names if n in fields]
        shown = sum(n in fields for names in COMMON[command].values() for n in names)
        lines += ["", *textwrap.wrap(f"{shown} of {len(fields)} fields shown. Blocks: "
                                     f"{', '.join(_blocks(parser)) or 'none'}.", width),
                  f"psr {command} --help BLOCK (or WORD) lists those fields with their help; --help-all every field."]
        return "\n".join(lines) + "\n"

    def chosen(name):
        return which == "" or name == which or name.startswith(which + ".")
    if which and not any(chosen(n) for n in fields):
        chosen = lambda name: which.replace("-", "_") in name  # noqa: E731 (a word: --help lora)
    if not any(chosen(n) for n in fields):
        close = difflib.get_close_matches(which, {n.split(".")[0] for n in fields}, n=1)
        parser.error(f"no field matches {which!r}" + (f"; did you mean --help {close[0]}?" if close else ""))
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    formatter.add_text(parser.description)
    for group in parser._action_groups:
        picked = [a for a in group._group_actions
                  if (a.dest.startswith(DEST) and chosen(a.dest[len(DEST):])) or (which == "" and a in own)]
        if picked:
            formatter.start_section(group.title)
            formatter.add_arguments(picked)
            formatter.end_section()
    return formatter.format_help()


class _Help(argparse.Action):
    """``--help`` (common fields), ``--help PREFIX``, ``--help-all``."""

    def __call__(self, parser, namespace, values, option_string=None):
        which = "" if option_string == "--help-all" else values
        parser._print_message(format_help(parser, parser.prog.split()[-1], which), sys.stdout)
        parser.exit()


def config_class(command: str) -> type:
    module, _, name = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# dataclass fields -> flags
# ---------------------------------------------------------------------------------------------
def _without_none(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the config checker names the key and the bad value


def _converter(tp):
    if _without_none(tp) is str:  # a string stays as typed (a path "1.0" is not a number); null -> None
        return (lambda text: None if text in ("null", "~") else text) if _without_none(tp) is not tp else str
    return _yaml_value


def _metavar(tp) -> str:
    tp = _without_none(tp)
    return {int: "INT", float: "FLOAT", str: "STR"}.get(tp, "YAML")


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _shown(value) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix(" ...")
    return text if len(text) <= 60 else text[:57] + "..."


def _add_fields(parser, group, cls, defaults, prefix: str, aliases: dict, mappings: list[str]) -> None:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name, tp, default = prefix + f.name, hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            about = docs[f.name] or (tp.__doc__ or "").strip().split("\n\n")[0]
            sub = parser.add_argument_group(f"{name}.*", " ".join(about.split()))
            _add_fields(parser, sub, tp, default, name + ".", aliases, mappings)
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        flags += [flag for flag, target in aliases.items() if target == name]
        text = f"{docs[f.name]} (default: {_shown(default)})".replace("%", "%%")
        kwargs = dict(dest=DEST + name, default=argparse.SUPPRESS, help=text)
        base = _without_none(tp)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(base)), metavar="{" + ",".join(typing.get_args(base)) + "}")
        else:
            kwargs.update(type=_converter(tp), metavar=_metavar(tp))
        if base is dict or typing.get_origin(base) is dict:
            mappings.append(name)
            kwargs["help"] += f"; or one key at a time: --{name}.KEY VALUE"
        group.add_argument(*flags, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, cls, aliases: dict | None = None) -> list[str]:
    """A flag for every field of ``cls`` (nested dataclasses: dotted names, one argument group each);
    returns the dotted names of mapping fields, which also take ``--NAME.KEY VALUE``."""
    mappings = []
    _add_fields(parser, parser.add_argument_group("fields"), cls, cls(), "", aliases or {}, mappings)
    return mappings


def _mapping_overrides(rest: list[str], mappings: list[str], parser) -> dict:
    """``--train.trl.optim adafactor`` (or ``=adafactor``) for the mapping fields; anything else is an error."""
    out, i = {}, 0
    while i < len(rest):
        flag, eq, value = rest[i].partition("=")
        if not any(flag.startswith(f"--{m}.") and len(flag) > len(m) + 3 for m in mappings):
            parser.error(unknown_flag(parser, rest[i]))
        if not eq:
            if i + 1 == len(rest):
                parser.error(f"argument {flag}: expected one argument")
            i += 1
            value = rest[i]
        out[flag[2:]] = _yaml_value(value)
        i += 1
    return out


def unknown_flag(parser, arg: str) -> str:
    """``unknown flag --widht; did you mean --width?``: the nearest of the command's flags."""
    flag = arg.partition("=")[0]
    if not flag.startswith("-"):
        return f"unexpected value {arg!r} (every value follows its --FIELD)"
    known = [o for a in parser._actions for o in a.option_strings]
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    if not close and "." in flag:  # a field under another block: --search.widht -> --search.width
        close = difflib.get_close_matches(flag, [o for o in known if "." in o], n=1, cutoff=0.5)
    return f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "")


def config_from_args(args, mappings: list[str], rest: list[str], parser):
    """The command's config: ``--config`` (if given), then the flags on top, strictly checked."""
    overrides = {k[len(DEST):]: v for k, v in vars(args).items() if k.startswith(DEST)}
    overrides.update(_mapping_overrides(rest, mappings, parser))
    return load_config(config_class(args.command), args.config, overrides)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------
def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_eval(cfg, args) -> int:
    from psr.evaluate import evaluate, format_table

    result = evaluate(cfg)
    if result:  # rank 0 only (under several processes the others return {})
        print(format_table(result))
        if cfg.out:
            print(f"wrote {cfg.out}")
    return 0


def cmd_search(cfg, args) -> int:
    from psr.pairs import format_stats
    from psr.search import run_search

    stats = run_search(cfg)
    if stats:  # rank 0 only
        print(format_stats(stats))
        print(f"wrote {cfg.out}/search.jsonl and {cfg.out}/pairs.jsonl")
    return 0


def cmd_judge_eval(cfg, args) -> int:
    from psr.judge_eval import format_judge_eval, judge_eval

    print(format_judge_eval(judge_eval(cfg)))
    return 0


def _print_train_result(result: dict, out: str, what: str) -> None:
    t, final = result["timing"], result["final"]
    keep = ("loss", "rewards/margins", "rewards/accuracies", "mean_token_accuracy")
    shown = {k: round(v, 4) for k, v in final.items() if k in keep}
    print(f"{what}: {t.get('steps', 0)} steps, {t.get('median_s_per_step', float('nan'))} s/step, "
          f"peak {result['peak_rss_mb']:.0f} MB; last log {shown}")
    print(f"wrote {out} (load it with: psr eval --model {out})")


def cmd_init(cfg, args) -> int:
    from psr.train.common import world_size
    from psr.train.sft import run_init

    result = run_init(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        n = result["examples"]
        _print_train_result(result, cfg.out, f"init (IFT {n['ift']} + EFT {n['eft']}, {world_size()} process(es))")
    return 0


def cmd_train(cfg, args) -> int:
    from psr.train.common import world_size
    from psr.train.step_dpo import run_train

    result = run_train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        left_out = ""
        if result.get("pairs_skipped"):
            detail = ", ".join(f"{n} {why}" for why, n in result["pairs_skipped"].items())
            left_out += f"; skipped {sum(result['pairs_skipped'].values())} of {result['pairs_in_file']} ({detail})"
        if result.get("pairs_truncated"):
            left_out += f"; {result['pairs_truncated']} cut at max_length"
        _print_train_result(result, cfg.out,
                            f"step-DPO on {result['pairs']} pairs{left_out} ({world_size()} process(es))")
    return 0


def cmd_build_ift(cfg, args) -> int:
    from psr.build_ift import format_skipped, run_build_ift

    stats = run_build_ift(cfg)
    skipped = format_skipped(stats["skipped"], stats["skipped_lines"], cfg.task.data)
    print(f"wrote {stats['rows']} IFT rows ({stats['mean_steps']} steps each on average) to {cfg.out}; "
          f"skipped {sum(stats['skipped'].values())}: {skipped}; read rows "
          f"{stats['rows_read'][0]}-{stats['next_offset'] - 1}: start the next stage at --offset "
          f"{stats['next_offset']}")
    return 0


def cmd_build_eft(cfg, args) -> int:
    from psr.build_eft import format_stats, run_build_eft

    print(format_stats(run_build_eft(cfg)))
    print(f"wrote {cfg.out} (train on it: psr init --eft_data {cfg.out})")
    return 0


def cmd_iterate(cfg, args) -> int:
    from psr.rounds import iterate

    iterate(cfg, args.run, args.restart_from, args.stop_after)
    return 0


def cmd_report(cfg, args) -> int:
    from psr.report import main as report_main

    return report_main([args.run])


RUNNERS = {"eval": cmd_eval, "search": cmd_search, "judge-eval": cmd_judge_eval, "init": cmd_init,
           "train": cmd_train, "build-ift": cmd_build_ift, "build-eft": cmd_build_eft, "iterate": cmd_iterate}


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``psr`` parser; the flags of ``commands`` only (default: all; their configs are imported)."""
    parser = Parser(prog="psr", description=__doc__, allow_abbrev=False, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, about, aliases) in COMMANDS.items():
        p = sub.add_parser(name, help=about, description=about, allow_abbrev=False, add_help=False,
                           formatter_class=_Formatter,
                           usage=f"psr {name} [-h [BLOCK]] [--help-all] [--config FILE] [--FIELD VALUE ...]")
        p.add_argument("-h", "--help", action=_Help, nargs="?", default=argparse.SUPPRESS, metavar="BLOCK",
                       help="the common fields; with BLOCK (train, sampling, ...) or a WORD (lora) those fields")
        p.add_argument("--help-all", action=_Help, nargs=0, default=argparse.SUPPRESS, help="every field")
        p.set_defaults(func=RUNNERS[name], mappings=[])
        if name == "iterate":
            p.add_argument("--config", required=True, metavar="FILE",
                           help="the run's YAML recipe (recipes/<model>/iterate/config_*.yaml)")
            p.add_argument("--run", help="run folder (default runs/<name>)")
            p.add_argument("--restart-from", metavar="STAGE", help="redo from this stage on, e.g. psr/round_1/search; "
                           "config changes used only from there on are accepted with it")
            p.add_argument("--stop-after", choices=["init", "search", "train", "eval"],
                           help="stop once the next unfinished stage of this kind is done; "
                           "none left: stop at once (for make targets)")
        else:
            p.add_argument("--config", metavar="FILE", help="YAML file with the fields below (flags win over it)")
        if commands is None or name in commands:
            cls = config_class(name)
            fields = {f.name for f in dataclasses.fields(cls)}
            common = {flag: target for flag, target in ALIASES.items() if target.split(".")[0] in fields}
            p.set_defaults(mappings=add_config_arguments(p, cls, {**common, **aliases}))
    p = sub.add_parser("report", help="write report.md and plots for a run folder", allow_abbrev=False)
    p.add_argument("run", help="run folder, e.g. runs/demo")
    p.set_defaults(func=cmd_report, mappings=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from psr.distributed import PREEMPTED_EXIT, Preempted
    from psr.files import DataError, ResourceError, disk_full, is_no_space
    from psr.models import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    known = [*COMMANDS, "report"]
    if command is not None and command not in known:
        close = difflib.get_close_matches(command, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"psr: error: unknown command {command!r}; {hint}(commands: {', '.join(known)})", file=sys.stderr)
        return 2
    parser = build_parser([command])
    args, rest = parser.parse_known_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if args.mappings is None and rest:
        sub.error(unknown_flag(sub, rest[0]))
    _quiet_libraries()
    try:
        cfg = None if args.mappings is None else config_from_args(args, args.mappings, rest, sub)
        return args.func(cfg, args)
    except (ConfigError, ModelLoadError, DataError, ResourceError) as err:
        print(f"psr {args.command}: error: {err}", file=sys.stderr)
        return PREEMPTED_EXIT if isinstance(err, Preempted) else 2  # 3: stopped before the time limit, requeue
    except OSError as err:  # a full disk in a library's own write (issue 29): one line, naming the file
        if not is_no_space(err):
            raise
        print(f"psr {args.command}: error: {disk_full(err.filename or 'a file', err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # one line, not a traceback: say what is kept and how to go on
        print(f"\npsr {args.command}: interrupted; {RESUME.get(args.command, 'nothing was kept: run it again')}",
              file=sys.stderr)
        return 130
    finally:
        from psr.distributed import close

        close()  # leave the process group cleanly (gloo may abort a process that exits without)


if __name__ == "__main__":
    sys.exit(main())
