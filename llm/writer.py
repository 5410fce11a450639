"""The one owner of what the toolkit writes: output directories and single files, atomically, and only its own.

A directory (model, data, adapter, gptq, tokenizer, run) is built under a hidden temporary sibling and renamed into
place when complete; it carries MARKER (`.llm-owner.json`: the kind and the command that made it), which is how
later commands know the toolkit made it. A single file (GGUF) is written under a temporary sibling name and
renamed; a JSON report (`write_report`: --json of tools/eval.py and tools/generate.py) names the tool that wrote it
under REPORT_KEY. The rules, whatever the flags:
- a directory without the marker is never replaced or deleted (an empty one is, as nothing in it can be lost);
- a file is replaced only with `overwrite` and only if it is a file of the same kind (a GGUF by its magic bytes);
  a JSON report replaces only a report of the toolkit (a re-run updates its numbers);
- `overwrite` replaces only the toolkit's own output of the same kind (a run directory is never replaced by a model);
- an output path that is, or holds, one of the command's inputs is refused (resolved paths compared).
Directories written by versions before the marker are accepted as the toolkit's when they hold exactly what it
writes and nothing else (`legacy_kind`: a data dir whose meta.json says "complete": true, a model dir of
config.json + safetensors + tokenizer files, an adapter dir, a tokenizer dir); anything else is the user's.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from llm.errors import UserError

MARKER = ".llm-owner.json"
KINDS = ("model", "data", "adapter", "gptq", "tokenizer", "run")
REPORT_KEY = "written_by"  # the tool that wrote a JSON report: the proof that replacing it loses nothing
FILE_KINDS = {"gguf": b"GGUF"}  # single-file outputs and the magic bytes that identify one
FILE_EXAMPLES = {"gguf": "model.gguf", "tokenizer": "tokenizer.model"}
TOKENIZER_FILES = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.vocab", "chat_template.jinja"}
MODEL_FILES = TOKENIZER_FILES | {"config.json", "generation_config.json", "model.safetensors.index.json",
                                 "quantize_config.json", "quant_log.csv", "report.json"}  # + GPTQ dirs
ADAPTER_FILES = TOKENIZER_FILES | {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                   "context_extension.json"}  # llm.tasks.lora.EXTENSION


def owner(path: str | os.PathLike) -> Optional[str]:
    """The kind of toolkit output the directory `path` is (its marker, or `legacy_kind`), or None."""
    path = Path(path)
    try:
        return json.loads((path / MARKER).read_text())["kind"]
    except FileNotFoundError:
        return legacy_kind(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an unreadable marker proves nothing


def legacy_kind(path: Path) -> Optional[str]:
    """The kind of a directory written before markers existed, recognized by holding only the files that kind
    has (no subdirectories); None for anything else."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return None
    if not entries or any(not e.is_file() or e.is_symlink() for e in entries):
        return None
    names = {e.name for e in entries}
    if "meta.json" in names and all(n == "meta.json" or n.endswith(".bin") for n in names):
        try:
            return "data" if json.loads((path / "meta.json").read_text()).get("complete") is True else None
        except (OSError, ValueError, AttributeError):
            return None
    if "adapter_config.json" in names and all(n in ADAPTER_FILES or n.endswith(".safetensors") for n in names):
        return "adapter"
    if "config.json" in names and all(n in MODEL_FILES or n.endswith(".safetensors") for n in names):
        try:
            return "gptq" if json.loads((path / "config.json").read_text()).get("quantization_config") else "model"
        except (OSError, ValueError, AttributeError):
            return None
    if "tokenizer.model" in names and names <= TOKENIZER_FILES:
        return "tokenizer"
    return None


def check_inputs(dst: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), flag: str = "--out"):
    """Refuse an output path that is one of the inputs or a folder holding one (builtin: corpora are skipped)."""
    d = Path(dst).resolve()
    for i in inputs:
        if i is None or str(i).startswith("builtin:"):
            continue
        p = Path(i).resolve()
        if p == d or d in p.parents:
            what = "is" if p == d else "holds"
            raise UserError(f"{flag} {dst}: {what} the input {i} — choose an output path outside the inputs")


def check_dir(dst: str | os.PathLike, kind: str, inputs: Iterable = (), overwrite: bool = False,
              flag: str = "--out"):
    """Raise a one-line UserError unless a `kind` directory may be written at `dst` (see the module docstring)."""
    assert kind in KINDS, kind
    dst = Path(dst)
    check_inputs(dst, inputs, flag)
    if not dst.exists() and not dst.is_symlink():
        return
    if not dst.is_dir():
        raise UserError(f"{flag} {dst}: exists and is not a directory — it is never replaced; choose another {flag}")
    if not any(dst.iterdir()):
        return
    found = owner(dst)
    if found is None:
        raise UserError(f"{flag} {dst}: exists and was not made by this toolkit — it is never replaced or deleted "
                        f"(--overwrite included); choose another {flag}")
    if found != kind:
        raise UserError(f"{flag} {dst}: holds a {found} directory of this toolkit, not a {kind} one — it is never "
                        f"replaced by a {kind}; choose another {flag}")
    if not overwrite:
        raise UserError(f"{flag} {dst}: already holds a {kind} directory — pass --overwrite true to replace it, "
                        f"or choose another {flag}")


def make_dir(path: str | os.PathLike, kind: str) -> bool:
    """Create `path` (and parents) carrying the marker of `kind`; True if it was created, False if it existed
    (an existing directory is left as it is: a marker is never added to a folder the toolkit did not make)."""
    path = Path(path)
    if path.is_dir():
        return False
    _mkdir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory — choose another path") from None
        return False
    except OSError as e:
        raise UserError(f"{path}: cannot create the directory ({e.strerror}) — choose another path") from None
    _mark(path, kind)
    return True


def _mkdir(path: Path):
    """`path` and its parents, or one line saying why not (a file in the way, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise UserError(f"{blocker}: is a file, not a directory — choose another path") from None
    except OSError as e:
        raise UserError(f"{path}: cannot create the directory ({e.strerror}) — choose another path") from None


def _mark(path: Path, kind: str):
    # deterministic content: two builds of the same inputs give identical directories
    (path / MARKER).write_text(json.dumps({"kind": kind, "command": Path(sys.argv[0] or "python").name}) + "\n")


def temp_dir(dst: str | os.PathLike) -> Path:
    """A temporary sibling directory of `dst`, which `commit_dir` renames into place."""
    dst = Path(dst)
    _mkdir(dst.parent)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def commit_dir(tmp: Path, dst: str | os.PathLike, kind: str, inputs: Iterable = (), overwrite: bool = True,
               flag: str = "--out") -> Path:
    """Mark `tmp` as a `kind` output and rename it to `dst`, replacing an older `dst` only if `check_dir` allows
    it (checked again here: the destination may have changed while the output was built)."""
    dst = Path(dst)
    check_dir(dst, kind, inputs, overwrite, flag)
    _mark(tmp, kind)
    for f in [tmp, *tmp.rglob("*")]:
        f.chmod(0o755 if f.is_dir() else 0o644)  # mkdtemp makes it private; outputs are meant to be shared
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def write_dir(dst: str | os.PathLike, kind: str, inputs: Iterable = (), overwrite: bool = True,
              flag: str = "--out") -> Iterator[Path]:
    """`with write_dir(dst, "model") as tmp:` write into tmp; on success it becomes dst, on an error it is
    removed and dst is untouched. Checked before (fail early) and again at the rename."""
    inputs = list(inputs)
    check_dir(dst, kind, inputs, overwrite, flag)
    tmp = temp_dir(dst)
    try:
        yield tmp
        commit_dir(tmp, dst, kind, inputs, overwrite, flag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_kind_file(path: Path, kind: str) -> bool:
    """Whether the file `path` is a `kind` output (GGUF: its magic bytes; tokenizer files: in a tokenizer
    directory of the toolkit)."""
    if kind == "tokenizer":
        return owner(path.parent) == "tokenizer"
    try:
        with open(path, "rb") as f:
            return f.read(len(FILE_KINDS[kind])) == FILE_KINDS[kind]
    except OSError:
        return False


def check_file(dst: str | os.PathLike, kind: str, inputs: Iterable = (), overwrite: bool = False,
               flag: str = "--dst"):
    """Raise a one-line UserError unless a `kind` file may be written at `dst`: a new path, or with `overwrite`
    an existing file of the same kind."""
    dst = Path(dst)
    check_inputs(dst, inputs, flag)
    if dst.is_dir():
        raise UserError(f"{flag} {dst}: is a directory — pass a file path, e.g. {dst / FILE_EXAMPLES[kind]}")
    if not dst.exists() and not dst.is_symlink():
        return
    if not overwrite:
        raise UserError(f"{flag} {dst}: exists — pass --overwrite true to replace it, or choose another {flag}")
    if dst.is_symlink() or not dst.is_file() or not is_kind_file(dst, kind):
        raise UserError(f"{flag} {dst}: exists and is not a {kind} file of this toolkit — it is never replaced "
                        f"(--overwrite included); choose another {flag}")


@contextlib.contextmanager
def write_file(dst: str | os.PathLike, kind: str, inputs: Iterable = (), overwrite: bool = False,
               flag: str = "--dst") -> Iterator[Path]:
    """`with write_file(dst, "gguf") as tmp:` write the file tmp; on success it is renamed to dst."""
    dst, inputs = Path(dst), list(inputs)
    check_file(dst, kind, inputs, overwrite, flag)
    _mkdir(dst.parent)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        check_file(dst, kind, inputs, overwrite, flag)
        tmp.chmod(0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def replace_text(path: str | os.PathLike, text: str):
    """Write `text` to `path` inside a directory the toolkit owns (a run directory's summary.json, metrics.csv,
    trainer_state.json): a temporary file renamed over it, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_report(path: Optional[str | os.PathLike], flag: str = "--json"):
    """Raise a one-line UserError unless a JSON report may be written at `path`: a new path or a report of ours
    (None: no report asked for, nothing to check). Called before the work, so a refusal costs nothing."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory — pass a file path, e.g. {path / 'report.json'}")
    if path.exists() or path.is_symlink():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            ours = not path.is_symlink() and isinstance(old, dict) and REPORT_KEY in old
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UserError(f"{flag} {path}: exists and is not a report of this toolkit — it is never replaced; "
                            f"choose another {flag}")


def write_report(path: str | os.PathLike, report: dict, tool: str, flag: str = "--json"):
    """Write the JSON object `report` (with REPORT_KEY = `tool`) to `path`, replacing only an earlier report of the
    toolkit (`check_report`, before the write and at the rename)."""
    path = Path(path)
    check_report(path, flag)
    _mkdir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({REPORT_KEY: tool, **report}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        check_report(path, flag)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
