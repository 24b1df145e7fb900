"""Generation as a generator: token ids from ``generate_step``, text pieces from ``generate_text``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from .config import SamplingParams


@dataclass
class StepResult:
    token: int
    logits: np.ndarray | None  # float32 [vocab], before sampling; None where a greedy sampler's token was picked
    #                            on the backend (decode steps: CausalLM.decode_greedy)


def generate_step(net, prompt_ids: Sequence[int], sampler, cache=None, max_tokens: int = 256,
                  prefill_chunk: int = 512) -> Iterator[StepResult]:
    """Prefill the prompt (in chunks), then decode one token per step until the caller stops or max_tokens.

    The sampler is called as ``sampler(logits, history, generated)``; one whose ``greedy`` is true (argmax, no
    bias or penalties) is not called after the prefill: the decode steps are ``CausalLM.greedy_decode`` (the
    backend picks each argmax token, the logits stay where they are, and where it can one step runs ahead of
    the host). If ``cache`` already holds a prefix of the prompt (its first ``cache.length`` tokens), only the
    rest is prefilled.
    """
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("the prompt is empty")
    if cache is None:
        cache = net.make_cache(min(net.config.max_position_embeddings, len(ids) + max_tokens))
    if cache.length >= len(ids):
        cache.trim(len(ids) - 1)  # recompute the last prompt token's logits
    todo = ids[cache.length:]
    for i in range(0, len(todo), prefill_chunk):
        logits = net.forward_batch([(todo[i:i + prefill_chunk], cache)], last_only=True)[0][-1]
    generated: list[int] = []
    if max_tokens <= 0:
        return
    token = int(sampler(logits, ids, generated))
    generated.append(token)
    yield StepResult(token, logits)
    if getattr(sampler, "greedy", False):  # the backend picks each token (one step in flight where it can)
        with closing(net.greedy_decode(token, cache, max_steps=max_tokens - 1)) as steps:
            for token in steps:
                generated.append(token)
                yield StepResult(token, None)
        return
    while len(generated) < max_tokens and cache.length < cache.max_len:
        logits = net.forward_batch([([token], cache)], last_only=True)[0][-1]
        token = int(sampler(logits, ids + generated, generated))
        generated.append(token)
        yield StepResult(token, logits)


def generate_text(model, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int = 256,
                  stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None, cache=None,
                  tokens_out: list[int] | None = None) -> Iterator[str]:
    """Text pieces: UTF-8-safe streaming detokenization, stop token ids (default: the model's EOS ids) and
    stop strings that may span tokens (never partially emitted). ``cache`` may hold a prefix of the prompt;
    sampled token ids are appended to ``tokens_out``."""
    from .sampling import make_sampler
    from .stops import StopMatcher

    stop_ids = set(model.config.eos_token_id if stop_token_ids is None else stop_token_ids)
    if stop_token_ids is None and model.tokenizer is not None:
        stop_ids |= set(model.tokenizer.eos_token_ids)
    detok = model.tokenizer.detokenizer(skip_special_tokens=True)
    matcher = StopMatcher(list(stop)) if stop else None
    sampler = make_sampler(params)
    context = cache.max_len if cache is not None else model.config.max_position_embeddings
    room = context - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {context}")
    for step in generate_step(model.net, prompt_ids, sampler, cache=cache, max_tokens=min(max_tokens, room)):
        if tokens_out is not None:
            tokens_out.append(step.token)
        if step.token in stop_ids:
            break
        piece = detok.add(step.token)
        if matcher is not None:
            piece, stopped = matcher.push(piece)
            if piece:
                yield piece
            if stopped:
                return
        elif piece:
            yield piece
    tail = detok.flush()
    if matcher is not None:
        tail, stopped = matcher.push(tail)
        if not stopped:
            tail += matcher.flush()
    if tail:
        yield tail
