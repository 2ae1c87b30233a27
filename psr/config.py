"""Configs: YAML files and command-line values -> dataclasses, strictly. An unknown key, a key
given twice or a value of the wrong type is an error that names the key
(``train.beta: expected a number, got 'high'``).

:func:`load_config` is the one loader: a YAML file, then dotted overrides from the command line
(``{"train.beta": 0.2}``), checked by the same :func:`from_dict`. A partial nested block
(``search: {sampling: {t0: 0.9}}``) is merged onto that field's default, so the keys it leaves out
keep the values the enclosing config gives them. Every field's help text is the comment beside (or
above) it in the source (:func:`field_docs`); ``psr <command> --help`` shows it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

# Settings that change how a stage reports or how often it checkpoints, not what it computes (at any depth
# of a config): never a config change (psr.rounds), never part of a cache's or a checkpoint's fingerprint
# (psr.chunks, psr.train.common).
COSMETIC_KEYS = frozenset({"progress", "report_to", "logging_steps", "logging_dir", "run_name", "log_level",
                           "disable_tqdm", "save_steps", "save_total_limit", "save_every_hours"})


def cosmetic_key(key: str) -> bool:
    """Is the (possibly dotted) ``key`` a reporting setting (:data:`COSMETIC_KEYS`)?"""
    return key.rsplit(".", 1)[-1] in COSMETIC_KEYS


class ConfigError(ValueError):
    """A bad configuration; the message names the offending key."""


def check_value(value, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (typing.Any,)
        return [check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 5e-7 as a string; accept numeric strings for floats.
            try:
                return float(value) if isinstance(value, str) else _raise(key, "a number", value)
            except ValueError:
                _raise(key, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _raise(key, "an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _raise(key, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            _raise(key, "a string", value)
        return value
    return value


def check_at_least(obj, minimum: int, *names: str) -> None:
    """For a dataclass's ``__post_init__``: ValueError naming the first of ``names`` whose value is
    below ``minimum`` (``None`` passes: it means "all" or "the default" where a field allows it)."""
    hints = typing.get_type_hints(type(obj))
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            nullable = type(None) in typing.get_args(hints[name])
            raise ValueError(f"{name} must be >= {minimum}{' (or null)' if nullable else ''}, got {value}")


def _raise(key, what, value):
    raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _merge(base: dict, update: dict) -> dict:
    """``update`` on top of ``base``; nested mappings are merged key by key, anything else replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError. A nested
    dataclass field given as a partial mapping starts from the field's own default (its
    ``default_factory``), not from the nested class's defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        f, tp = fields[name], hints[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(tp) and f.default_factory is not dataclasses.MISSING:
            value = _merge(to_dict(f.default_factory()), value)
        kwargs[name] = check_value(value, tp, f"{prefix}.{name}" if prefix else name)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}" if prefix else str(err)) from err
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"key {key!r} appears twice (second time on line {line})")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with the same key twice is an error (PyYAML
    keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key != "<<" and key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory (expected a YAML file)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                          "save the file as UTF-8") from err
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def set_dotted(data: dict, key: str, value) -> None:
    """``data["train"]["beta"] = value`` for ``key = "train.beta"``, creating the blocks on the way."""
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a mapping")
        node = child
    node[leaf] = value


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """The one loader: ``cls`` from the YAML file ``path`` (if any) with ``overrides`` on top.
    Override keys are dotted (``{"search.sampling.t0": 0.9}``); values are checked like the file's.
    An error names the key and where the bad value came from (the file or the command line)."""
    data = load_yaml(path) if path else {}
    if not overrides:
        try:
            return from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}" if path else str(err)) from err
    merged = copy.deepcopy(data)  # set_dotted writes into nested blocks: keep the file's own values apart
    for key, value in overrides.items():
        set_dotted(merged, key, value)
    try:
        return from_dict(cls, merged)
    except ConfigError as err:
        if path:
            try:
                from_dict(cls, data)
            except ConfigError as file_err:
                raise ConfigError(f"{path}: {file_err}") from err
        raise ConfigError(f"command line: {err}") from err


# ---------------------------------------------------------------------------------------------
# Field docs: the comment beside or above each field in the source
# ---------------------------------------------------------------------------------------------
# Help for fields that many configs share, where their class leaves them without a comment.
COMMON_HELP = {
    "model": "the model: hub id, local directory, or a built-in name (smollm2-135m, tiny-random)",
    "task": "where the problems come from",
    "method": "psr: step-wise search with the model as its own step judge; srlm: the outcome-based baseline",
    "split": "the task's split to draw problems from (train or test)",
    "limit": "how many problems (null: all)",
    "seed": "random seed",
    "round": "the round number recorded in every pair",
    "dtype": "weights' dtype for inference (null: float32 on CPU, bfloat16 on CUDA)",
    "out": "output path",
    "max_new_tokens": "most new tokens per generated text",
    "judge_max_new_tokens": "generate-mode judge: most new tokens per reply",
}


def _comments_by_line(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


@functools.cache
def _class_field_comments(klass) -> dict[str, str]:
    """``{field: comment}`` for the fields ``klass`` itself declares: the comment lines right above
    the field, then the comment at the end of its line(s)."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments = _comments_by_line(source)
    node = ast.parse(source).body[0]
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, i = [], stmt.lineno - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, comments.get(i, ""))
            i -= 1
        beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        text = " ".join(t for t in above + beside if t)
        if text:
            out[stmt.target.id] = text
    return out


def field_docs(cls) -> dict[str, str]:
    """Help text of every field of dataclass ``cls``: its comment in the source (a subclass that
    re-declares a field without a comment keeps the base class's), else :data:`COMMON_HELP`."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_class_field_comments(klass))
    return {f.name: docs.get(f.name) or COMMON_HELP.get(f.name, "") for f in dataclasses.fields(cls)}
