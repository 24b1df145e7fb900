"""`1bit train`: ternary (BitNet b1.58 / TriLM) quantization-aware training on a text corpus, then export."""

from __future__ import annotations

import json

# argparse name -> (TrainArgs field, type, help); defaults come from TrainArgs itself
_SHAPE = {
    "--arch": ("arch", str, "bitnet (sub-norms, ReLU², int8 activations) or llama (SwiGLU, 16-bit activations)"),
    "--hidden": ("hidden", int, "hidden size"),
    "--layers": ("layers", int, "transformer layers"),
    "--heads": ("heads", int, "attention heads"),
    "--kv-heads": ("kv_heads", int, "key/value heads (0: as many as --heads)"),
    "--ffn": ("ffn", int, "MLP size (0: 8/3 x hidden, rounded up to 256)"),
    "--ctx": ("ctx", int, "context length in tokens"),
    "--vocab": ("vocab", int, "BPE vocabulary to train (with 4 special tokens)"),
    "--batch": ("batch", int, "sequences per step"),
    "--lr": ("lr", float, "peak learning rate (0: 2e-3 ternary, 1e-3 with --fp)"),
    "--warmup": ("warmup", int, "warmup steps"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay on matrices"),
    "--dropout": ("dropout", float, "residual and embedding dropout"),
    "--steps": ("steps", int, "training steps (or --minutes)"),
    "--minutes": ("minutes", float, "train for this many minutes; the schedule is sized from measured speed"),
    "--seed": ("seed", int, "seed of initialization, batches and dropout"),
    "--eval-every": ("eval_every", int, "steps between held-out evals (0: 10 per run)"),
    "--eval-tokens": ("eval_tokens", int, "evaluate on the first N held-out tokens only (0: all)"),
    "--ckpt-every": ("ckpt_every", int, "steps between checkpoints (0: at every eval)"),
    "--max-bytes": ("max_bytes", int, "use only about this many bytes of the corpus (0: all)"),
    "--stop-after": ("stop_after", int, "stop at this step with a checkpoint (resume later)"),
}


def add_arguments(p) -> None:
    import dataclasses

    from ..train import TrainArgs  # no torch

    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    p.add_argument("--data", help="corpus folder: every *.txt in it except austen_persuasion.txt")
    p.add_argument("--out", default="train-out", help="output folder (checkpoint, model/, model.gguf, eval.json)")
    for flag, (field, typ, text) in _SHAPE.items():
        p.add_argument(flag, dest=field, type=typ, default=defaults[field], help=text)
    p.add_argument("--fp", action="store_true", help="train the full-precision twin (no quantizers)")
    p.add_argument("--untied", action="store_true", help="a separate lm_head instead of the tied embedding")
    p.add_argument("--tokenizer", help="reuse this tokenizer folder instead of training one")
    p.add_argument("--init", help="start from this float HF checkpoint (its shape and tokenizer)")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint.pt exactly")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not torch.compile (CUDA)")
    p.add_argument("--eval-file", help="held-out text (default: austen_persuasion.txt in --data)")
    p.add_argument("--gguf-type", default="auto", choices=["auto", "i2_s", "tq2_0", "tq1_0"],
                   help="ternary GGUF type (auto: i2_s for bitnet, tq2_0 for llama)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args) -> int:
    import dataclasses
    import importlib.util

    from ..errors import UnsupportedError
    from ..train import TrainArgs, train

    if importlib.util.find_spec("torch") is None:
        raise UnsupportedError("1bit train needs PyTorch: pip install 'onebit[train]'")

    names = {f.name for f in dataclasses.fields(TrainArgs)}
    summary = train(TrainArgs(**{k: v for k, v in vars(args).items() if k in names}))
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    if "stopped_at" in s:
        return f"stopped at step {s['stopped_at']}; resume with --resume {s['checkpoint']}"
    lines = [f"{s['kind']} {s['arch']}: {s['parameters']['linear']:,} linear + {s['parameters']['other']:,} other "
             f"parameters, {s['steps']} steps, {s['tokens_seen']:,} tokens in {s['train_seconds']} s on {s['device']}"]
    e = s.get("eval")
    if e:
        lines.append(f"held-out {s['eval_file']}: ppl {e['ppl']:.3f}, {e['bits_per_byte']:.4f} bits/byte "
                     f"({e['tokens']:,} tokens, ctx {e['ctx']}, stride {e['stride']})")
    lines += [f"wrote {p}" for p in s["exported"].values()]
    return "\n".join(lines)
