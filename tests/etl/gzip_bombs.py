"""Gzip files that inflate far beyond their size, built without holding them inflated."""

from __future__ import annotations

import zlib


def gz_repeat(piece: bytes, times: int, tail: bytes = b"") -> bytes:
    """A gzip of ``piece * times + tail``, compressed as it streams: ``piece`` is the most
    this ever holds inflated (1 MiB of one byte, 1024 times: 1 GiB in ~1 MB)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [deflate.compress(piece) for _ in range(times)]
    return b"".join([*out, deflate.compress(tail), deflate.flush()])
