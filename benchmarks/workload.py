"""Argument types shared by the serving benchmarks (benchmarks/serve.py, engine_serve.py)."""

from __future__ import annotations

import argparse


def token_range(text: str) -> tuple[int, int]:
    """"LOW:HIGH" (or "N") -> (LOW, HIGH), for lengths drawn uniformly from that range."""
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW:HIGH with 1 <= LOW <= HIGH")
    return lo, hi
