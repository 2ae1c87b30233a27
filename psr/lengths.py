"""Does a prompt fit the engine's context? The one place that says how long a context is and what
happens to a prompt that does not fit.

vLLM refuses a request whose prompt is longer than ``max_model_len`` with an exception that ends the
rank (and again on every resume, since the same prompt comes back); HF runs past
``max_position_embeddings`` into positions the model never saw, or fails on absolute positions. A
generate-mode judge prompt of a 7B run (question, up to 19 earlier steps, two candidates of up to 512
tokens each) does not fit 4096 tokens. So every prompt is measured before it reaches an engine, and
each stage applies a stated rule to the ones that do not fit, and counts them:

- search candidates, build-eft candidates: the problem stops there (``status: too_long``), the steps
  and pairs kept so far stand;
- the step judge: earlier steps are left out from the front (the prompt says how many) until the
  comparison fits; if even the question and the two candidates do not fit, the step is no preference
  (counted, and the search's tie rule treats it as a tie);
- SRLM's rubric: a response whose rubric prompt does not fit gets no score (as an unparseable reply);
- evaluation: a problem whose prompt leaves less than ``max_new_tokens`` is not solved and counts wrong;
- rollouts: a candidate whose rollout prompt does not fit is unsure (no label), not wrong.

Below all of them, :func:`psr.generation.generate` and the vLLM engine never send a prompt that leaves
no room for one new token (its completions are empty, with a warning), and cut a completion's budget to
what the context has left: a last guard, not a rule a stage relies on.
"""

from __future__ import annotations

import sys


def context_limit(model) -> int | None:
    """Tokens of prompt + completion the engine holds: a vLLM engine's ``max_model_len``; an HF model's
    ``generation.max_model_len`` (set by :func:`psr.engines.load_generator`, so both backends cut at the
    same length) and its ``max_position_embeddings``, whichever is smaller; None when nothing says."""
    if getattr(model, "is_vllm_engine", False):
        return model.max_len
    limits = [getattr(model, "psr_max_len", None),
              getattr(getattr(model, "config", None), "max_position_embeddings", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def token_count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def room(limit: int | None, n_tokens: int) -> int | None:
    """Tokens a prompt of ``n_tokens`` leaves for the completion (None: no limit known)."""
    return None if limit is None else limit - n_tokens


def fits(model, tok, prompts: list[str], new_tokens: int) -> list[bool]:
    """For each prompt: does it leave ``new_tokens`` tokens of the context for its completion?"""
    limit = context_limit(model)
    if limit is None:
        return [True] * len(prompts)
    return [token_count(tok, p) + new_tokens <= limit for p in prompts]


def warn_not_sent(n: int, limit: int | None, where: str) -> None:
    """The last guard's line: prompts an engine call did not send because they leave no room at all."""
    if n:
        print(f"warning: {where}: {n} prompt(s) longer than the context ({limit} tokens) not sent; their "
              "completions are empty", file=sys.stderr)
