"""Files: atomic writes (a reader never sees a half-written artifact, and a killed stage leaves
none) and the one JSONL reader, whose errors name the file and the line."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and the field."""


class ResourceError(RuntimeError):
    """The machine lacks what a stage needs (disk space, GPU memory); the message is the one line to show."""


class DiskFull(ResourceError):
    """No space (or quota) left while writing a file; the message names the file."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(err: BaseException) -> bool:
    """An OSError for a full disk or quota, or a library's error that says so (safetensors raises its own)."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_full(path: str | Path, err: BaseException) -> DiskFull:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return DiskFull(f"no space left on the device writing {path} ({reason}); nothing half-written was kept: free "
                    "space (or quota) and start the same command again")


def umask() -> int:
    """This process's umask (read without changing it, where /proc says; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``. The file gets the mode
    the umask gives a new file (mkstemp's 0600 would hide a run from its group on a shared file system); a full
    disk is :class:`DiskFull` naming ``path``, and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if is_no_space(err):
            raise disk_full(path, err) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# what write_text_atomic's temporary files are called: "." + the file's name + "." + mkstemp's 8 characters
PARTIAL_WRITE = re.compile(r"^\..+\.[a-z0-9_]{8}$")


def remove_partial_writes(folder: str | Path) -> int:
    """Delete the temporary files that killed atomic writes left in ``folder`` (not below it); how many. Only
    while no one writes there (a run's rank 0 at its start, holding the run's lock)."""
    removed = 0
    for path in Path(folder).glob(".*"):
        if PARTIAL_WRITE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSONL file (UTF-8, a byte-order mark
    allowed); a line that is not UTF-8 or not a JSON object, a directory or a missing file raises
    :class:`DataError` naming ``file:line`` or the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a JSONL file")
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    with f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from err
            if line.strip():
                yield lineno, _json_object(line, f"{path}:{lineno}")


def _json_object(text: str, where: str, whole_file: bool = False) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        at = f" at line {err.lineno}, column {err.colno}" if whole_file else ""
        raise DataError(f"{where}: not valid JSON ({err.msg}{at})") from err
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: str | Path) -> list[dict]:
    """Every row of a JSONL file (blank lines skipped), checked as :func:`iter_jsonl` does."""
    return [row for _, row in iter_jsonl(path)]


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; a missing, unreadable, empty or cut-off file raises :class:`DataError`
    naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start + 1})") from err
    if not text.strip():
        raise DataError(f"{path}: empty file (expected a JSON object)")
    return _json_object(text, str(path), whole_file=True)


def check_safetensors(path: str | Path) -> None:
    """Cheap integrity check of a ``.safetensors`` file: its header parses and covers the whole file
    (a truncated copy fails here); raises :class:`DataError` naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error type (not an OSError) for a damaged header
        raise DataError(f"{path}: damaged safetensors file ({err})") from err


def path_identity(name: str | None):
    """What tells two versions of a local model directory apart: its files' names, sizes and times (a
    retrained model written to the same path has new ones); a name that is no directory (a hub id) as is."""
    path = Path(name) if name else None
    if path is None or not path.is_dir():
        return name
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
