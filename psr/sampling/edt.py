"""EDT: entropy-based dynamic temperature (Zhang et al. 2024, arXiv 2403.14541).

For each row of the batch, with p the softmax of the raw logits and H = -sum p log p (nats),
T = t0 * n ** (theta / H), 0 < n < 1: confident rows (H -> 0) get T -> 0 (greedy), uncertain
rows get T -> t0. Pass ``temperature=1.0`` to ``generate`` so it does not scale twice; top-p
(a built-in warper) runs after this processor.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MIN_ENTROPY = 1e-6  # below this a row is treated as greedy
_MIN_TEMPERATURE = 1e-3  # dividing by a smaller T overflows bf16/fp16 logits


class EDTLogitsProcessor(LogitsProcessor):
    def __init__(self, t0: float, n: float = 0.8, theta: float = 0.5):
        if not (0 < n < 1 and t0 > 0 and theta > 0):
            raise ValueError(f"EDT needs 0 < n < 1, t0 > 0, theta > 0; got t0={t0}, n={n}, theta={theta}")
        self.t0, self.n, self.theta = float(t0), float(n), float(theta)

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-row temperature (float32, shape [batch])."""
        logits = scores.float()
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        # Masked (-inf) tokens have p = 0; 0 * -inf would be NaN, so they contribute 0 explicitly.
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1).clamp_min(0.0)
        temp = self.t0 * torch.pow(torch.tensor(self.n), self.theta / entropy.clamp_min(_MIN_ENTROPY))
        return temp.clamp_min(_MIN_TEMPERATURE)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        temp = self.temperatures(scores)
        scaled = scores.float() / temp[:, None]
        # A near-zero T makes a row greedy; keep its argmax finite and everything else below it.
        greedy = temp <= _MIN_TEMPERATURE
        if greedy.any():
            top = scores.float().argmax(dim=-1)
            masked = torch.full_like(scaled, float("-inf"))
            masked.scatter_(1, top[:, None], 0.0)
            scaled = torch.where(greedy[:, None], masked, scaled)
        return scaled  # float32, whatever the model dtype: no bf16 overflow after dividing by a small T
