"""`1bit <command>`: parses arguments and hands over to onebit.commands.<command>, imported on use."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": "serve the model over an OpenAI-compatible HTTP API (sessions, batching, auth, metrics)",
    "run": "generate text from a prompt, streamed to the terminal",
    "chat": "chat interactively, with the model's chat template",
    "info": "describe a model: architecture, sizes, formats, bits per weight, tokenizer",
    "convert": "write any supported model as GGUF (tq2_0, tq1_0 or i2_s)",
    "synth": "write a random ternary model with real shapes (benchmarks, tests)",
    "train": "train a ternary model (BitNet b1.58 QAT) on a text corpus and export it",
    "ppl": "perplexity and bits per byte of a text file under a model",
    "bench": "measure decode/prefill speed and memory against the roofline (and llama.cpp)",
    "mcp": "MCP server on stdio (Claude Desktop, Cursor...) over a running `1bit serve`",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="1bit", description="Local inference for ternary (1.58-bit) language models.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more (and show tracebacks)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"onebit.commands.{name}")
        sp = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from .errors import OneBitError

    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OneBitError, OSError, ValueError) as e:
        if args.verbose:
            raise
        print(f"1bit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
