"""Sampling policies: how a stage that samples turns logits into tokens.

Every stage that samples has a ``sampling:`` block (``SamplingConfig``): ``policy: edt | fixed |
greedy``, with ``t0, n, theta, top_p`` for EDT and ``temperature, top_p`` for fixed. EDT is the
default of the data-generation stage (candidate next steps); eval's maj@k can use either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psr.sampling.edt import EDTLogitsProcessor

__all__ = ["EDTLogitsProcessor", "SamplingConfig"]


@dataclass
class SamplingConfig:
    """``greedy``; ``fixed`` temperature + top-p; or ``edt`` (entropy-based dynamic temperature,
    T = t0 * n ** (theta / H) per row, then top-p)."""

    policy: Literal["greedy", "fixed", "edt"] = "greedy"  # greedy decoding, fixed temperature, or EDT
    temperature: float = 0.7  # fixed
    top_p: float = 0.95  # fixed and edt
    t0: float = 0.8  # edt: upper bound of the temperature
    n: float = 0.8  # edt: base, 0 < n < 1 (paper: 0.8)
    theta: float = 0.5  # edt: strength

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.policy == "fixed" and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for policy fixed (use policy: greedy), got {self.temperature}")
        if self.policy == "edt" and not (0 < self.n < 1 and self.t0 > 0 and self.theta > 0):
            raise ValueError(f"edt needs 0 < n < 1, t0 > 0, theta > 0; "
                             f"got n={self.n}, t0={self.t0}, theta={self.theta}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate`` implementing this policy."""
        if self.policy == "greedy":
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if self.policy == "fixed":
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        # EDT scales each row itself; temperature=1.0 so generate's own warper does not scale twice.
        return {"do_sample": True, "temperature": 1.0, "top_p": self.top_p, "top_k": 0,
                "logits_processor": [EDTLogitsProcessor(self.t0, self.n, self.theta)]}
