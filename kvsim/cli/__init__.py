"""The ``kvsim`` command line: every argument parser lives in this package, one module per command (or
family of commands); each parses its arguments and calls the module that does the work. Engine options
are generated from :class:`kvsim.config.EngineConfig` (``kvsim.cli.common``)."""

from __future__ import annotations

import sys

from kvsim.cli import bench, calibrate, compare, fit_methods, listing, plan, replay, validate
from kvsim.cli.common import (  # what other command lines reuse
    HelpFormatter, Parser, add_engine_args, add_run_args, add_trace_arg, apply_config_file, engine_config, model_arg,
    parse_slo,
)
from kvsim.errors import KvsimError

#: the command modules, in the order ``kvsim --help`` lists their commands
COMMANDS = (replay, listing, compare, bench, validate, calibrate, fit_methods, plan)


def build_parser() -> Parser:
    p = Parser(prog="kvsim", description="What KV-cache compression does to serving throughput and latency.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        apply_config_file(args)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return rc
    except KvsimError as e:
        print(f"kvsim: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError) as e:
        # a path the user gave that cannot be used as given: an input error like the others, not a crash
        print(f"kvsim: error: {e.filename}: {e.strerror}" if e.filename else f"kvsim: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `kvsim ... | head`: the reader left; say nothing more (Python's recipe: stdout to devnull so the
        # interpreter's final flush does not fail again)
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass  # no real file descriptor behind stdout: nothing left to flush at exit
        return 1


__all__ = ["HelpFormatter", "Parser", "add_engine_args", "add_run_args", "add_trace_arg", "apply_config_file",
           "build_parser", "engine_config", "main", "model_arg", "parse_slo"]
