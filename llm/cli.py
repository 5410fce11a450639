"""Running a typed function or dataclass as a command line (jsonargparse), with user errors reported cleanly.

Every CLI of the toolkit goes through `run_cli`: `--config FILE.yaml`, `--print_config` and `--help` from the
signature and docstrings; DeepSpeed's `--local_rank=N` accepted; a `UserError`, a mistake in a YAML or an option
(`llm.settings_check.check_args`: file, line and key, the closest valid key, types and signs checked before any use), or an
OSError about a path the user gave (no permission, a folder where a file is expected, ...), printed as one line
without the usage, exit 2.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from llm.errors import UserError


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead. Keep only the env var."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def defaults_from(path: str | os.PathLike):
    """Decorator: the entry point's settings default to the YAML `path` (run_cli reads it first; a `--config` and
    the options override it), so a default is written once, in the config file."""
    def mark(fn: Callable) -> Callable:
        fn.default_config = path
        return fn

    return mark


def run_cli(component: Callable | dict[str, Callable], args: list[str] | None = None,
            default_config: str | os.PathLike | None = None) -> Any:
    """Run `component` (a function, or {subcommand: function}) as a command line. `default_config` (default: the
    one `defaults_from` gave the function): a YAML whose values replace the signature's defaults (a `--config` and
    the options still override it)."""
    from argparse import ArgumentError

    from jsonargparse import CLI

    from llm.settings_check import check_args, schema_of
    from llm.train.dist import is_main, quiet_cpu_accelerator

    args = strip_local_rank(sys.argv[1:] if args is None else args)
    quiet_cpu_accelerator()
    default_config = default_config or getattr(component, "default_config", None)
    once = is_main()  # every rank runs the same command on the same input: one of them says what is wrong
    try:
        check_args(schema_of(component), args)  # YAML and option mistakes: one line naming file, line and key
    except ValueError as e:
        if once:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        defaults = {"default_config_files": [str(default_config)]} if default_config else {}
        return CLI(component, args=args, as_positional=False, exit_on_error=False, **defaults)
    except ArgumentError as e:  # what the check above leaves to jsonargparse: its message in one line
        if once:
            print(f"error: {' '.join(str(e).split())} (see --help)", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        if once:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError, FileExistsError) as e:
        # a path the user gave (or its folder) that cannot be used as asked: one line, not a traceback
        if once:
            print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)


OS_ERROR_FIX = {PermissionError: "check its permissions, or choose a path you can write to",
                IsADirectoryError: "give a file path, not a folder", NotADirectoryError: "a part of the path is a "
                "file, not a folder — check the path", FileNotFoundError: "check the path",
                FileExistsError: "choose another path"}


def os_error_message(e: OSError) -> str:
    """`path: what went wrong — what to do` for an OSError about a path."""
    path = e.filename if e.filename is not None else "a path"
    fix = next((f for cls, f in OS_ERROR_FIX.items() if isinstance(e, cls)), "check the path")
    return f"{path}: {e.strerror or e} — {fix}"
