"""Launched by tests/test_vllm.py under ``accelerate launch`` (2 CPU processes): an evaluation and a search
on the vLLM backend, one engine per rank. The search has a single chunk, so rank 1 has nothing to do and must
still build its engine beside rank 0's (their setup is collective). Writes what rank 0 merged."""

import json
import sys
from pathlib import Path


def main(folder: str):
    from psr.distributed import close, context
    from psr.engines import GenerationConfig
    from psr.evaluate import EvalConfig, evaluate
    from psr.search import SearchConfig, run_search

    rank, world, _ = context()
    gen = GenerationConfig(backend="vllm", kv_cache_gb=0.5)
    out = Path(folder)
    result = evaluate(EvalConfig(model="smollm2-135m", limit=3, chunk_size=1, max_new_tokens=48, generation=gen,
                                 out=str(out / "eval.json")), progress=False)
    stats = run_search(SearchConfig(model="smollm2-135m", limit=1, width=2, max_steps=2, max_step_tokens=32,
                                    generation=gen, out=str(out / "search")), progress=False)
    if rank == 0:
        merged = {"world": world, "outputs": [p["output"] for p in result["problems"]],
                  "backend": result["throughput"]["backend"],
                  "ranks": [r["rank"] for r in result["throughput"]["ranks"]], "searched": stats["problems"]}
        (out / "rank0.json").write_text(json.dumps(merged))
    close()


if __name__ == "__main__":
    main(sys.argv[1])
