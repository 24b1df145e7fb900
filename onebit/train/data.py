"""Training data: the corpus files (held-out text excluded), a byte-level BPE tokenizer, packed token windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tokenizer import BYTE_LEVEL_SPECIALS, CHATML_TEMPLATE, Tokenizer

HELD_OUT = "austen_persuasion.txt"
SPECIAL_TOKENS = BYTE_LEVEL_SPECIALS  # <|begin_of_text|>, <|end_of_text|>, <|im_start|>, <|im_end|>


def corpus_files(data_dir: str | Path, exclude: tuple[str, ...] = (HELD_OUT,)) -> list[Path]:
    """Every ``*.txt`` under ``data_dir`` (sorted, recursive) except the held-out names."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file() and p.name not in exclude)
    if not files:
        raise ValueError(f"{root}: no training .txt files (excluding {', '.join(exclude)})")
    return files


def find_held_out(data_dir: str | Path) -> Path | None:
    """The held-out evaluation text inside the corpus folder, if present."""
    found = sorted(Path(data_dir).rglob(HELD_OUT))
    return found[0] if found else None


def read_texts(files: list[Path], max_bytes: int | None = None) -> list[str]:
    """The files' texts; ``max_bytes`` keeps about that many bytes in all, the same share of each file."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    total = sum(len(t.encode("utf-8")) for t in texts)
    if max_bytes and total > max_bytes:
        frac = max_bytes / total
        texts = [t[: max(1, int(len(t) * frac))] for t in texts]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 splitting, so llama.cpp's ``gpt-2`` pre-tokenizer matches), 4 specials, ChatML.

    Specials take ids 0-3, then the 256 byte symbols, then merges; encode() prepends ``<|begin_of_text|>``.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos, eos, _, end = SPECIAL_TOKENS
    return Tokenizer(backend, special_tokens={"bos_token": bos, "eos_token": eos},
                     eos_token_ids=[backend.token_to_id(end)], chat_template=CHATML_TEMPLATE, add_bos=True)


def encode_documents(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """One packed stream: each text as ``<|begin_of_text|> ... <|end_of_text|>``; int32 [N]."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pieces = [split_for_encoding(t) for t in texts]
    flat = tok.backend.encode_batch([p for ps in pieces for p in ps], add_special_tokens=False)  # in parallel
    parts, i = [], 0
    for ps in pieces:
        ids = [t for e in flat[i:i + len(ps)] for t in e.ids]
        parts.append(np.array([bos, *ids, eos], dtype=np.int32))
        i += len(ps)
    return np.concatenate(parts)


def split_for_encoding(text: str, size: int = 1 << 16) -> list[str]:
    """Pieces of about ``size`` characters, cut only before a newline that follows a non-space character.

    No GPT-2 pre-token crosses such a cut (only whitespace runs reach a newline, and the regex has no
    look-behind), so the pieces encode to exactly the ids of the whole text, in parallel.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_text(tok: Tokenizer, text: str) -> np.ndarray:
    """A text as the harness encodes it (BOS first): int32 [N]."""
    return np.asarray(tok.encode(text), dtype=np.int32)


class TokenWindows:
    """Random windows of a packed stream. Batch ``step`` depends only on (seed, step): resumable exactly."""

    def __init__(self, tokens: np.ndarray, ctx: int, seed: int):
        if tokens.size < ctx + 2:
            raise ValueError(f"{tokens.size} training tokens: too few for a context of {ctx}")
        self.tokens, self.ctx, self.seed = tokens, ctx, seed

    def batch(self, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) int64 [batch, ctx], targets shifted by one."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.ctx - 1, size=batch)
        idx = starts[:, None] + np.arange(self.ctx + 1)[None, :]  # (batch, ctx + 1)
        w = self.tokens[idx].astype(np.int64)
        return w[:, :-1], w[:, 1:]


__all__ = ["HELD_OUT", "SPECIAL_TOKENS", "corpus_files", "find_held_out", "read_texts", "train_tokenizer",
           "encode_documents", "encode_text", "TokenWindows"]
