"""A multi-turn conversation over one KV cache: each turn prefills only the tokens the cache lacks."""

from __future__ import annotations

from collections.abc import Iterator

from .cache import common_prefix
from .config import SamplingParams


class ChatSession:
    def __init__(self, model, system: str | None = None, max_len: int | None = None):
        self.model, self.system = model, system
        self.cache = model.make_cache(max_len)
        self.cached: list[int] = []  # the tokens whose K/V the cache holds
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.trim(0)
        self.cached = []

    def send(self, text: str, max_tokens: int = 256, stop=(), **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply (which joins the history)."""
        from .generate import generate_text

        self.messages.append({"role": "user", "content": text})
        ids = self.model.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True)
        keep = common_prefix(self.cached, ids)
        self.last_reused = keep  # prompt tokens whose K/V came from the cache
        self.cache.trim(keep)
        self.cached = self.cached[:keep]
        generated: list[int] = []
        reply = []
        try:
            for piece in generate_text(self.model, ids, SamplingParams(**sampling), max_tokens=max_tokens,
                                       stop=stop, cache=self.cache, tokens_out=generated):
                reply.append(piece)
                yield piece
        finally:
            self.cached = (ids + generated)[: self.cache.length]
            self.messages.append({"role": "assistant", "content": "".join(reply)})

