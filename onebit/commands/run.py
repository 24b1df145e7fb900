"""`1bit run`: stream a completion of one prompt to the terminal."""

from __future__ import annotations

import sys
import time

from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt ('-' or omitted: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    add_sampling_arguments(p)


def main(args) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty() and prompt is None:
            raise ValueError("give a prompt with -p PROMPT (or pipe it on standard input)")
        prompt = sys.stdin.read()
    model = load_model(args)
    kw = sampling_kwargs(args)
    t0, n = time.perf_counter(), 0
    if args.chat:
        pieces = model.chat([{"role": "user", "content": prompt}], **kw)
    else:
        sys.stdout.write(prompt)
        pieces = model.generate(prompt, **kw)
    for piece in pieces:
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        dt = time.perf_counter() - t0
        print(f"[{n} pieces in {dt:.2f} s, {n / dt:.1f}/s, backend {model.backend.name}]", file=sys.stderr)
    return 0
