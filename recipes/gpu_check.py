"""``make gpu-check``: on one CUDA GPU, in under 10 minutes, every stage of the loop on CUDA (bf16), and the
memory each stage hands back, written to ``results/gpu/``.

1. the tiny loop (tiny-random, recipes/tiny/iterate/config_tiny.yaml, one round, HF generation): the plumbing;
2. the embedded model (SmolLM2-135M, tests/recipes/smoke.yaml, PSR and SRLM arms) generating on vLLM when it
   imports (else HF) at the default ``gpu_memory_utilization`` 0.85: the case of a 7B run, where a vLLM engine
   asks for most of the GPU right after a training stage.

Every stage's marker holds the GPU memory before and after it (``psr.rounds``); a stage passes when what torch
holds after it is within ``--tolerance-gib`` of what it held before, i.e. training and engines gave their memory
back. ``results/gpu/gpu_check.json`` has the device, versions, each stage's time and memory, and the verdict; the
runs' reports are copied beside it. Without CUDA it refuses in one line and runs nothing.

    python recipes/gpu_check.py [--out results/gpu] [--backend auto|hf|vllm]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [  # (name, recipe, overrides)
    ("tiny", ROOT / "recipes" / "tiny" / "iterate" / "config_tiny.yaml", {"rounds": 1, "generation.backend": "hf"}),
    ("embedded", ROOT / "tests" / "recipes" / "smoke.yaml", {"methods": ["psr", "srlm"], "eval_m0": True}),
]


def run_configs(backend: str) -> list[tuple[str, object]]:
    """(name, RunConfig) of each run, the embedded one on ``backend``: built (and checked) before any runs."""
    from psr.config import load_config
    from psr.rounds import RunConfig

    return [(name, load_config(RunConfig, recipe, {**overrides, **({"generation.backend": backend}
                                                                  if name == "embedded" else {})}))
            for name, recipe, overrides in RUNS]


def stage_memory(run_dir: Path) -> list[dict]:
    """Each finished stage's time and GPU memory (from its marker), in the order they ran."""
    rows = []
    for marker in run_dir.rglob("*.done"):
        info = json.loads(marker.read_text())
        rows.append({"stage": info.get("stage"), "seconds": info.get("seconds"), "finished_at": info.get("finished_at"),
                     "gpu_memory": info.get("gpu_memory")})
    return sorted(rows, key=lambda r: r["finished_at"] or "")


def memory_problems(rows: list[dict], tolerance_gib: float) -> list[str]:
    """Stages that kept more than ``tolerance_gib`` of GPU memory (allocated or reserved) past their end."""
    problems = []
    for r in rows:
        m = r["gpu_memory"]
        if not m:
            problems.append(f"{r['stage']}: no GPU memory in its marker (did it run on CUDA?)")
            continue
        for key in ("allocated_gib", "reserved_gib"):
            kept = m["after"][key] - m["before"][key]
            if kept > tolerance_gib:
                problems.append(f"{r['stage']}: {key.removesuffix('_gib')} {m['before'][key]:.2f} -> "
                                f"{m['after'][key]:.2f} GiB, {kept:.2f} GiB not handed back")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu", help="where the runs and gpu_check.json go")
    parser.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto",
                        help="the embedded model's engine (auto: vllm when it imports)")
    parser.add_argument("--tolerance-gib", type=float, default=0.25, help="memory a stage may keep past its end")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU and torch sees none here; nothing was run", file=sys.stderr)
        return 2
    from psr.rounds import iterate

    backend = args.backend if args.backend != "auto" else ("vllm" if importlib.util.find_spec("vllm") else "hf")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "backend": backend, "tolerance_gib": args.tolerance_gib, "runs": {}}
    started = time.perf_counter()
    for (name, recipe, overrides), (_, cfg) in zip(RUNS, run_configs(backend)):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: every stage runs and is measured
        t0 = time.perf_counter()
        entry = {"recipe": str(recipe.relative_to(ROOT)), "overrides": overrides,
                 "backend": cfg.generation.backend}
        try:
            iterate(cfg, run_dir=run_dir, progress=False)
            entry["stages"] = stage_memory(run_dir)
            entry["problems"] = memory_problems(entry["stages"], args.tolerance_gib)
            if (run_dir / "report.md").exists():
                shutil.copy(run_dir / "report.md", out / f"report_{name}.md")
        except Exception as err:  # recorded in the results (the point of the check), then the check fails
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["problems"] = [entry["error"]]
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result["runs"][name] = entry
    result["seconds"] = round(time.perf_counter() - started, 1)
    problems = [f"{n}: {p}" for n, e in result["runs"].items() for p in e["problems"]]
    result["passed"] = not problems
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    for p in problems:
        print(f"gpu-check: {p}", file=sys.stderr)
    print(f"gpu-check: {'passed' if not problems else 'FAILED'} on {result['device']} in {result['seconds'] / 60:.1f} "
          f"min ({backend}); {out / 'gpu_check.json'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
