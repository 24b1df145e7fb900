"""Ternary quantization-aware training in torch (``1bit train``): model, data, loop, export.

``TrainArgs`` is importable without torch (the CLI builds its parser from it); ``train`` imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainArgs:
    """Everything a run depends on (saved in its checkpoints). 0 means "pick for me" where noted."""

    data: str | None = None  # corpus folder (every *.txt but the held-out file)
    out: str = "train-out"
    arch: str = "bitnet"
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 0  # 0: heads (MHA)
    ffn: int = 0  # 0: 8/3 x hidden rounded up to 256
    ctx: int = 512
    vocab: int = 8192
    untied: bool = False
    rope_theta: float = 10000.0
    batch: int = 64  # sequences of ctx tokens per step
    lr: float = 0.0  # peak; 0: 2e-3 ternary (QAT wants a higher rate), 1e-3 full precision
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.2  # residual and embedding; small corpora overfit fast (see scripts/train_default.sh)
    steps: int = 0
    minutes: float = 0.0
    fp: bool = False  # the full-precision twin: no quantizers
    init: str | None = None  # start from a float HF checkpoint (its shape and tokenizer)
    tokenizer: str | None = None  # a tokenizer folder to reuse (else one is trained)
    resume: str | None = None
    seed: int = 0
    device: str = "auto"
    compile: bool = True
    eval_file: str | None = None  # default: the corpus' held-out file
    eval_every: int = 0  # 0: about 10 evals per run
    eval_tokens: int = 0  # evaluate on the first N held-out tokens only (0: all, the default)
    ckpt_every: int = 0  # 0: at every eval
    max_bytes: int = 0  # use only about this many bytes of the corpus (tests)
    gguf_type: str = "auto"
    stop_after: int = 0  # stop (with a checkpoint) once this step is reached, without exporting
    progress: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ("bitnet", "llama"):
            raise ValueError(f"--arch must be bitnet or llama, got {self.arch!r}")
        if not self.resume and bool(self.steps) == bool(self.minutes):
            raise ValueError("give exactly one of --steps N or --minutes M")
        if not self.resume and not self.data:
            raise ValueError("give --data DIR (the corpus folder)")
        if not self.lr:
            self.lr = 1e-3 if self.fp else 2e-3


def train(a: TrainArgs) -> dict:
    """Train (or resume) a run and return its summary (what ``eval.json`` holds)."""
    from .loop import train as _train

    return _train(a)


__all__ = ["TrainArgs", "train"]
