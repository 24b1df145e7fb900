"""`Model`: a loaded network, its tokenizer and backend, with logits() and generate()."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig, SamplingParams


@dataclass
class ModelInfo:
    """What ``1bit info`` prints: where the model came from and how it is stored."""

    path: str
    format: str  # "hf-bitnet-packed", "hf-bitnet-online", "hf-trilm", "gguf-tq2_0", ...
    details: dict[str, Any]


class Model:
    """A ready-to-run model. ``net`` implements forward(ids, cache) -> logits on ``backend``."""

    def __init__(self, config: ModelConfig, net, tokenizer, backend, info: ModelInfo):
        self.config, self.net, self.tokenizer, self.backend, self.info = config, net, tokenizer, backend, info

    def make_cache(self, max_len: int | None = None):
        return self.net.make_cache(max_len)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: one fresh prefill of the whole sequence."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("logits() needs at least one token")
        self._check_ids(ids)
        cache = self.make_cache(ids.size)
        return self.net.forward(ids, cache)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: dict[int, float] | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stop_token_ids: Sequence[int] | None = None,
                 add_special_tokens: bool = True) -> Iterator[str]:
        """Stream text pieces for a prompt (text is tokenized; a list of ints is used as is)."""
        from .generate import generate_text

        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias or {}), seed=seed)
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = list(prompt)
        self._check_ids(np.asarray(ids, dtype=np.int64))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        yield from generate_text(self, ids, params, max_tokens=max_tokens, stop=stops, stop_token_ids=stop_token_ids)

    def chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Apply the chat template and stream the assistant's reply."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return self.generate(ids, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.arch}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
                f"backend={self.backend.name}, format={self.info.format})")
