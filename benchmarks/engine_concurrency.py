"""What more sequences in flight buy on this engine (issue 30): decoded tokens/s of vLLM against the number of
sequences decoding at once. The in-flight search driver's gain over lockstep comes from keeping more requests
in the engine; it is large only where throughput still rises with concurrency (a GPU decodes memory-bound, so
a batch of 200 costs little more than one of 20) and small where the engine is already compute-bound at a
lockstep chunk's size (a 2-core CPU).

Each point: ``n`` prompts (search prompts of the built-in task), one sampled completion each of exactly
``--tokens`` tokens (``ignore_eos``), all submitted at once; tokens/s = n * tokens / wall time.

    python benchmarks/engine_concurrency.py [--sizes 1,6,24,48,96,192] [--tokens 32]
        [--out results/search_engine/concurrency.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="1,6,24,48,96,192")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="results/search_engine/concurrency.json")
    args = ap.parse_args()
    from common import vllm_missing

    if vllm_missing("benchmarks/engine_concurrency.py"):
        return
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from psr.engines import GenerationConfig, load_generator
    from psr.steps import render_prompt
    from psr.tasks import ArithmeticTask

    engine, tok = load_generator(args.model, gen=GenerationConfig(backend="vllm"))
    sizes = [int(x) for x in args.sizes.split(",")]
    problems = ArithmeticTask().problems("train", max(sizes), seed=11)
    prompts = [TokensPrompt(prompt_token_ids=tok(render_prompt(tok, p.question), add_special_tokens=False)["input_ids"])
               for p in problems]

    def run(n):
        params = [SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=i) for i in range(n)]
        start = time.perf_counter()
        engine.llm.generate(prompts[:n], params, use_tqdm=False)
        return time.perf_counter() - start

    run(4)  # warm-up
    points = []
    for n in sizes:
        seconds = run(n)
        points.append({"sequences": n, "seconds": round(seconds, 2),
                       "tokens_per_second": round(n * args.tokens / seconds, 1)})
        print(json.dumps(points[-1]), flush=True)
    engine.close()
    base = next(p for p in points if p["sequences"] == sizes[0])["tokens_per_second"]
    for p in points:
        p["over_smallest"] = round(p["tokens_per_second"] / base, 2)
    result = {"model": args.model, "tokens": args.tokens, "points": points}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
