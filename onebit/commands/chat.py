"""`1bit chat`: an interactive conversation that keeps its KV cache between turns."""

from __future__ import annotations

import sys

from .common import add_model_arguments, add_sampling_arguments, load_model, sampling_kwargs


def add_arguments(p) -> None:
    add_model_arguments(p, optional=True)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(p)


def main(args) -> int:
    from ..chat_session import ChatSession

    model = load_model(args)
    session = ChatSession(model, system=args.system)
    kw = sampling_kwargs(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{model!r}\nType a message; /reset starts over, /exit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        for piece in session.send(line, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
