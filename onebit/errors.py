"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class OneBitError(Exception):
    """Base class: the message is complete and meant for a person."""


class FormatError(OneBitError):
    """A file is corrupt, truncated, or in a layout we do not read."""


class UnsupportedError(OneBitError):
    """A valid file that asks for something we do not support (architecture, tensor type)."""


class TokenizerError(OneBitError):
    """The tokenizer is missing or cannot be built."""


class NotTernaryError(OneBitError):
    """A checkpoint that should be ternary is not (use --ternarize to force it)."""
