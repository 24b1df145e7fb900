"""The training loop: AdamW, warmup + cosine, bf16 autocast and torch.compile on CUDA, evals, checkpoints.

Reproducible: batch ``step`` and its dropout masks depend only on (seed, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would (bit for bit on the CPU). ``minutes`` sizes the
schedule from the measured step time after a short warmup, so that the cosine ends on time (the budget
covers the training loop and its periodic evals, not data preparation or the final export).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..eval.ppl import PplResult, perplexity
from ..tokenizer import Tokenizer
from . import TrainArgs
from . import data as D
from .model import CausalLM

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


# --- schedule ---------------------------------------------------------------------------------------

def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_steps(budget_s: float, elapsed_s: float, step: int, step_s: float, eval_s: float, n_evals: int) -> int:
    """Total steps that fit the budget: what is left, less the evals still to run, at ``step_s`` a step."""
    left = budget_s - elapsed_s - eval_s * n_evals
    return max(step + 1, step + int(0.98 * left / step_s))


# --- setup -----------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def model_config(a: TrainArgs, vocab_size: int, tok: Tokenizer) -> ModelConfig:
    bitnet = a.arch == "bitnet"
    return ModelConfig(
        arch=a.arch, vocab_size=vocab_size, hidden_size=a.hidden,
        intermediate_size=a.ffn or _round_up(a.hidden * 8 // 3, 256), num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads, rms_norm_eps=1e-5,
        rope_theta=a.rope_theta, max_position_embeddings=a.ctx, tie_word_embeddings=not a.untied,
        hidden_act="relu2" if bitnet else "silu", act_bits=8 if bitnet else None,
        bos_token_id=tok.bos_token_id, eos_token_id=list(tok.eos_token_ids))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_optimizer(model: CausalLM, a: TrainArgs, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (linears, embedding) decay, norms do not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, a.beta2), eps=1e-8, fused=device.type == "cuda")


@dataclass
class Data:
    tok: Tokenizer
    train: np.ndarray  # packed training stream
    eval_ids: np.ndarray | None  # held-out text, BOS first
    eval_bytes: int
    eval_name: str | None


def prepare_data(a: TrainArgs, tok_dir: Path, resumed: bool = False) -> Data:
    """Read the corpus, train (or load) the tokenizer into ``tok_dir``, encode training and held-out text.

    A resumed run reads the tokenizer its checkpoint restored into ``tok_dir``.
    """
    texts = D.read_texts(D.corpus_files(a.data), a.max_bytes or None)
    if resumed:
        tok = Tokenizer.from_dir(tok_dir)
    elif a.tokenizer or a.init:
        tok = Tokenizer.from_dir(a.tokenizer or a.init)
        tok.save(tok_dir)
    else:
        tok = D.train_tokenizer(texts, a.vocab)
        tok.save(tok_dir)
    eval_path = a.eval_file or D.find_held_out(a.data)
    eval_text = Path(eval_path).read_text(encoding="utf-8") if eval_path else None
    return Data(tok, D.encode_documents(tok, texts),
                D.encode_text(tok, eval_text) if eval_text else None,
                len(eval_text.encode("utf-8")) if eval_text else 0, str(eval_path) if eval_path else None)


def build_model(a: TrainArgs, tok: Tokenizer) -> CausalLM:
    if a.init:
        from .export import load_float

        model = load_float(a.init, ternary=not a.fp, dropout=a.dropout)
        if model.config.max_position_embeddings < a.ctx:
            raise ValueError(f"--ctx {a.ctx} exceeds the {model.config.max_position_embeddings} positions of {a.init}")
        return model
    torch.manual_seed(a.seed)
    vocab = _round_up(tok.vocab_size, 64)
    return CausalLM(model_config(a, vocab, tok), ternary=not a.fp, dropout=a.dropout)


# --- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Owns the model, optimizer, data and schedule of one run; ``run()`` trains, evaluates and exports."""

    def __init__(self, a: TrainArgs, state: dict | None = None):
        self.a, self.out = a, Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(a.device)
        if state:
            _restore_tokenizer(state, self.out / "tokenizer")
        self.data = prepare_data(a, self.out / "tokenizer", resumed=state is not None)
        self.model = build_model(a, self.data.tok).to(self.device)
        self.opt = make_optimizer(self.model, a, self.device)
        self.windows = D.TokenWindows(self.data.train, a.ctx, a.seed)
        self.step, self.total = 0, a.steps or 0
        self.elapsed, self.history = 0.0, {"loss": [], "eval": []}
        if state:
            self._load_state(state)
        self.loss_fn = self._make_loss_fn()

    # -- one step --

    def _make_loss_fn(self):
        model = self.model

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(x)  # (B, T, vocab)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        if self.a.compile and self.device.type == "cuda":
            return torch.compile(loss_of)
        return loss_of

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_step(self) -> torch.Tensor:
        a = self.a
        x, y = (torch.from_numpy(t).to(self.device, non_blocking=True) for t in self.windows.batch(self.step, a.batch))
        torch.manual_seed(a.seed * 1_000_003 + self.step)  # this step's dropout masks
        lr = lr_at(self.step, a.lr, a.warmup, self.total or 10 ** 9, a.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.model.train()
        with self._autocast():
            loss = self.loss_fn(x, y)
        loss.backward()
        if a.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    # -- evaluation --

    @torch.no_grad()
    def evaluate(self, limit: int = 0, exact: bool = False) -> PplResult | None:
        """Held-out perplexity with the harness' windows (ctx, stride ctx/2); ``exact``: float32, no autocast."""
        d = self.data
        if d.eval_ids is None:
            return None
        ids = d.eval_ids[:limit] if limit else d.eval_ids
        n_bytes = len(d.tok.decode(ids[1:]).encode("utf-8")) if limit else d.eval_bytes
        self.model.eval()
        score = torch_scorer(self.model, self.device, autocast=not exact)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32 and not exact
        try:
            return perplexity(score, ids, n_bytes, self.a.ctx, self.a.ctx // 2, batch=16)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    # -- checkpoints --

    def save(self) -> Path:
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save({
            "format": "onebit-train-1", "args": dataclasses.asdict(self.a), "step": self.step,
            "total": self.total, "elapsed": self.elapsed, "history": self.history,
            "model": self.model.state_dict(), "optim": self.opt.state_dict(),
            "tokenizer": _tokenizer_files(self.out / "tokenizer"),
        }, tmp)
        os.replace(tmp, path)
        return path

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.step, self.total = state["step"], state["total"]
        self.elapsed, self.history = state["elapsed"], state["history"]

    # -- the run --

    def run(self) -> dict:
        """Train to the planned step (or ``stop_after``), then evaluate exactly and export."""
        a = self.a
        bar = _progress(a, self.step, self.total or None)
        loop = _Loop(self, bar)
        if self.total and self.step == 0:
            loop.warn_epochs()
        try:
            loop.run()
        finally:
            bar.close()
        self.save()
        if a.stop_after and self.step < self.total:
            return {"stopped_at": self.step, "checkpoint": str(self.out / CHECKPOINT)}
        return self.finish()

    def finish(self) -> dict:
        """Exact (float32) held-out evaluation, export, and ``eval.json``."""
        from .export import export_float, export_ternary

        result = self.evaluate(self.a.eval_tokens, exact=True)
        if result is not None:
            self.history["eval"].append({"step": self.step, "ppl": result.ppl, "bits_per_byte": result.bits_per_byte})
        folder = self.out / "model"
        if self.model.ternary:
            paths = export_ternary(self.model, self.data.tok, folder, str(self.out / "model.gguf"), self.a.gguf_type)
        else:
            paths = export_float(self.model, self.data.tok, folder)
        counts = self.model.num_parameters()
        summary = {
            "kind": "ternary" if self.model.ternary else "full-precision", "arch": self.a.arch,
            "parameters": counts, "steps": self.step, "tokens_seen": self.step * self.a.batch * self.a.ctx,
            "train_tokens": int(self.data.train.size), "train_seconds": round(self.elapsed, 1),
            "device": _device_name(self.device), "eval_file": self.data.eval_name,
            "final_train_loss": float(np.mean(self.history["loss"][-50:])) if self.history["loss"] else None,
            "eval": result.to_dict() if result else None, "eval_history": self.history["eval"], "exported": paths,
        }
        (self.out / "eval.json").write_text(json.dumps(summary, indent=2))
        return summary


class _Loop:
    """The step loop with its clock: logging, periodic eval/checkpoint and the --minutes plan."""

    LOG_EVERY = 10
    MEASURE = (5, 25)  # steps of this process timed (after compilation) to plan a --minutes run

    def __init__(self, t: Trainer, bar):
        self.t, self.bar = t, bar
        self.losses: list[torch.Tensor] = []
        self.n = 0  # steps run by this process
        self.elapsed0 = t.elapsed
        self.t0 = self.t_log = self.t_mark = time.perf_counter()

    def run(self) -> None:
        t, a = self.t, self.t.a
        while (not t.total or t.step < t.total) and not (a.stop_after and t.step >= a.stop_after):
            self.losses.append(t.train_step())
            self.n += 1
            if t.step % self.LOG_EVERY == 0 or t.step == t.total:
                self._log()
            if not t.total:
                self._plan()
            if t.total and (t.step % self._every() == 0 or t.step == t.total):
                self._eval_and_save()
            t.elapsed = self.elapsed0 + time.perf_counter() - self.t0
        if self.losses:
            self._log()

    def _every(self) -> int:
        return self.t.a.eval_every or max(1, self.t.total // 10)

    def _log(self) -> None:
        t, now = self.t, time.perf_counter()
        losses = torch.stack(self.losses).float().tolist()  # one device sync per LOG_EVERY steps
        tps = t.a.batch * t.a.ctx * len(losses) / max(1e-9, now - self.t_log)
        self.losses.clear()
        self.t_log = now
        lr = t.opt.param_groups[0]["lr"]
        t.history["loss"] += losses  # one value a step
        loss = sum(losses) / len(losses)
        self.bar.set_postfix_str(f"loss {loss:.3f}  lr {lr:.2e}  {_si(tps)} tok/s", refresh=False)
        self.bar.update(t.step - self.bar.n)

    def _plan(self) -> None:
        """--minutes: time this process' steps MEASURE[0]..MEASURE[1], run one eval, then fix the total."""
        t, (lo, hi) = self.t, self.MEASURE
        if self.n == lo:
            _sync(t.device)
            self.t_mark = time.perf_counter()
        elif self.n == hi:
            _sync(t.device)
            step_s = (time.perf_counter() - self.t_mark) / (hi - lo)
            e0 = time.perf_counter()
            t.evaluate(t.a.eval_tokens)
            eval_s = time.perf_counter() - e0
            elapsed = self.elapsed0 + time.perf_counter() - self.t0
            total = plan_steps(t.a.minutes * 60, elapsed, t.step, step_s, eval_s, 10)
            if t.a.eval_every:
                total = plan_steps(t.a.minutes * 60, elapsed, t.step, step_s, eval_s, total // t.a.eval_every)
            t.total = self.bar.total = total
            self.bar.write(f"planned {total} steps ({step_s * 1e3:.1f} ms/step, eval {eval_s:.1f} s) "
                           f"for {t.a.minutes:g} minutes", file=sys.stderr)
            self.warn_epochs()

    def warn_epochs(self, limit: float = 30.0) -> None:
        """Say so when the schedule repeats the corpus so often that held-out loss will likely rise."""
        t = self.t
        epochs = t.total * t.a.batch * t.a.ctx / max(1, t.data.train.size)
        if epochs > limit:
            self.bar.write(f"note: {t.total} steps see the {t.data.train.size:,} training tokens {epochs:.0f} times; "
                           "a small corpus overfits long before that (consider fewer --steps)", file=sys.stderr)

    def _eval_and_save(self) -> None:
        t = self.t
        r = t.evaluate(t.a.eval_tokens) if t.step < t.total else None  # the last step gets finish()'s exact eval
        if r is not None:
            t.history["eval"].append({"step": t.step, "ppl": r.ppl, "bits_per_byte": r.bits_per_byte})
            self.bar.write(f"step {t.step}: held-out ppl {r.ppl:.2f}, {r.bits_per_byte:.3f} bits/byte",
                           file=sys.stderr)
        if t.step % (t.a.ckpt_every or self._every()) == 0 and t.step < t.total:  # run() saves the last
            if self.losses:
                self._log()
            t.elapsed = self.elapsed0 + time.perf_counter() - self.t0
            t.save()


# --- helpers ---------------------------------------------------------------------------------------

def torch_scorer(model: CausalLM, device: torch.device, autocast: bool = False):
    """A harness scorer on the model's device: windows of equal length share a forward; NLL in float64."""
    def score(ids: np.ndarray, group: list) -> list[float]:
        out = [0.0] * len(group)
        by_len: dict[int, list[int]] = {}
        for i, w in enumerate(group):
            by_len.setdefault(w.end - w.begin, []).append(i)
        for idx in by_len.values():
            x = torch.from_numpy(np.stack([ids[group[i].begin:group[i].end] for i in idx])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                logits = model(x)  # (n, T, vocab)
            for j, i in enumerate(idx):
                w = group[i]
                rows = logits[j, w.first - 1 - w.begin: w.end - 1 - w.begin].double()  # (scored, vocab)
                target = x[j, w.first - w.begin: w.end - w.begin]
                nll = torch.logsumexp(rows, -1) - rows.gather(1, target[:, None])[:, 0]
                out[i] = float(nll.sum())
        return out

    return score


def _si(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _progress(a: TrainArgs, initial: int, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not a.progress,
                desc="fp" if a.fp else "ternary", mininterval=1.0)


def _tokenizer_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.json"))}


def _restore_tokenizer(state: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in state["tokenizer"].items():
        (folder / name).write_text(text, encoding="utf-8")


def load_checkpoint(path: str | os.PathLike) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "onebit-train-1":
        raise ValueError(f"{path}: not a 1bit training checkpoint")
    return state


RUNTIME_FIELDS = ("device", "compile", "stop_after", "progress")


def train(a: TrainArgs) -> dict:
    """Train (or resume) a run and return its summary (``eval.json``)."""
    state = None
    if a.resume:
        state = load_checkpoint(a.resume)
        saved = TrainArgs(**{**state["args"], "resume": None})
        out = a.out if a.out != TrainArgs.out else str(Path(a.resume).parent)
        a = dataclasses.replace(saved, **{k: getattr(a, k) for k in RUNTIME_FIELDS}, out=out, resume=a.resume)
    if a.device != "cpu" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Trainer(a, state).run()


__all__ = ["TrainArgs", "Trainer", "train", "lr_at", "plan_steps", "load_checkpoint", "torch_scorer", "CHECKPOINT"]
