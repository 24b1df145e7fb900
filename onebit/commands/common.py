"""Arguments shared by several commands (model, backend, sampling) and the code that applies them."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "default"  # the embedded ternary model (onebit/data/default.gguf)


def add_model_arguments(p: argparse.ArgumentParser, optional: bool = True) -> None:
    if optional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help="HF folder, .gguf file or built-in name: default (the embedded model, used when "
                            "none is given) or tiny-random")
    else:
        p.add_argument("model", help="HF folder, .gguf file or built-in name (default, tiny-random)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu", "numpy"],
                   help="compute backend; auto picks the fastest available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--lm-head", choices=["f16", "int8"], default="f16",
                   help="output matrix precision: f16 (exact) or int8 per row (half the bytes per token)")
    add_kv_dtype_argument(p)
    p.add_argument("--ternarize", action="store_true",
                   help="absmean-ternarize a full-precision LLaMA checkpoint (quality drops)")
    p.add_argument("--act-bits", choices=["auto", "8", "16"], default="auto",
                   help="activation precision before ternary linears (auto: the format's own)")


def add_kv_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=["auto", "f32", "f16"], default="auto",
                   help="KV cache precision: f16 halves its memory and reads; auto: f16 for models with int8 "
                        "activations (BitNet), f32 otherwise")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=40, help="0 disables")
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def load_model(args):
    import onebit

    act = {"auto": "auto", "8": 8, "16": None}[args.act_bits]
    return onebit.load(args.model, backend=args.backend, ternarize=args.ternarize, act_bits=act,
                       threads=args.threads, lm_head=args.lm_head, kv_dtype=args.kv_dtype)


def sampling_kwargs(args) -> dict:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                seed=args.seed, stop=args.stop)
