"""Pieces of the BPE vocabularies the tiny Qwen / Gemma tokenizers are built from (no hub here)."""

from __future__ import annotations

from typing import Sequence


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (``bytes_to_unicode``): what byte-level BPE vocabularies
    are written in (space is ``Ġ``, newline ``Ċ``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def add_chain_merges(symbols: Sequence[str], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Merge ``symbols`` left to right (s0+s1, (s0 s1)+s2, ...) so the whole piece becomes one token."""
    left = symbols[0]
    for nxt in symbols[1:]:
        if (left, nxt) not in merges:
            merges.append((left, nxt))
        left = left + nxt
        vocab.setdefault(left, len(vocab))
