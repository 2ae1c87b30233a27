"""EDT: entropy-based dynamic temperature (Zhang et al. 2024, arXiv 2403.14541).

For each row of the batch, with p the softmax of the raw logits and H = -sum p log p (nats),
T = t0 * n ** (theta / H), 0 < n < 1: confident rows (H -> 0) get T -> 0 (greedy), uncertain
rows get T -> t0. Pass ``temperature=1.0`` to ``generate`` so it does not scale twice; top-p
(a built-in warper) runs after this processor.

Edges: masked (-inf) tokens have p = 0 and add nothing to H, and stay -inf; a row whose T falls
below ``MIN_TEMPERATURE`` (H = 0 exactly gives T = 0) is made greedy: its argmax keeps its logit,
every other token becomes -inf. The output is float32 whatever the input dtype, so dividing by a
small T cannot overflow bf16/fp16; no NaN and no +inf leave the processor for finite input.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

MIN_TEMPERATURE = 1e-3  # below this a row is decoded greedily
_FLOAT32_MAX = torch.finfo(torch.float32).max


class EDTLogitsProcessor(LogitsProcessor):
    """Divide each row's logits by its own T = t0 * n ** (theta / H)."""

    def __init__(self, t0: float, n: float = 0.8, theta: float = 0.5):
        if not (0 < n < 1 and t0 > 0 and theta > 0):
            raise ValueError(f"EDT needs 0 < n < 1, t0 > 0, theta > 0; got t0={t0}, n={n}, theta={theta}")
        self.t0, self.n, self.theta = float(t0), float(n), float(theta)
        self._log_n_theta = math.log(self.n) * self.theta  # < 0

    def __repr__(self) -> str:
        return f"EDTLogitsProcessor(t0={self.t0}, n={self.n}, theta={self.theta})"

    @staticmethod
    def entropy(scores: torch.Tensor) -> torch.Tensor:
        """Entropy in nats of softmax(scores) per row (float32, shape [batch]); -inf entries count 0."""
        logp = torch.log_softmax(scores.float(), dim=-1)
        # A masked token has p = 0 and logp = -inf: 0 * -inf is NaN, so it is zeroed (as is a row
        # with every token masked, whose log_softmax is NaN throughout).
        return (logp.exp() * logp).nan_to_num_(0.0).sum(dim=-1).neg_().clamp_min_(0.0)

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-row temperature (float32, shape [batch]); exactly 0 where H = 0."""
        # n ** (theta / H) = exp(theta * ln(n) / H); H = 0 gives exp(-inf) = 0. The test is H > 0,
        # not a division by H: a -0.0 entropy would give exp(+inf) = inf.
        entropy = self.entropy(scores)
        return self.t0 * torch.where(entropy > 0, self._log_n_theta / entropy, float("-inf")).exp_()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()
        temp = self.temperatures(logits)
        scaled = (logits / temp.clamp_min(MIN_TEMPERATURE)[:, None]).clamp_(max=_FLOAT32_MAX)
        greedy = temp < MIN_TEMPERATURE
        if greedy.any():
            # Keep only the argmax of a greedy row, at its own (finite) logit; everything else -inf.
            top = logits.argmax(dim=-1, keepdim=True)
            top_logits = logits.gather(1, top).clamp_(max=_FLOAT32_MAX)
            only_top = torch.full_like(logits, float("-inf")).scatter_(1, top, top_logits)
            scaled = torch.where(greedy[:, None], only_top, scaled)
        return scaled
