"""generation.backend without vLLM installed: the flag and the loop carry it to every stage that generates,
a missing vLLM is a one-line error, and vLLM's in-process group of one is no world for psr."""

import importlib.util

import pytest
import torch

from psr.cli import build_parser, config_from_args
from psr.config import ConfigError
from psr.engines import GenerationConfig, load_generator
from psr.rounds import BenchmarkConfig, RunConfig, _kinds_reading


@pytest.mark.parametrize("command", ["eval", "search", "judge-eval", "iterate"])
def test_backend_flag_sets_generation_backend(command, tmp_path):
    argv = [command, "--backend", "vllm", "--generation.kv_cache_gb", "1.5"]
    if command == "iterate":
        argv += ["--config", str(tmp_path / "run.yaml")]
        (tmp_path / "run.yaml").write_text("name: x\n")
    parser = build_parser([command])
    args, rest = parser.parse_known_args(argv)
    cfg = config_from_args(args, args.mappings, rest, parser)
    assert cfg.generation == GenerationConfig(backend="vllm", kv_cache_gb=1.5)


def test_the_loop_gives_every_generating_stage_the_runs_engine():
    gen = GenerationConfig(backend="vllm")
    cfg = RunConfig(generation=gen)
    assert BenchmarkConfig().eval_config("m", 0, "out.json", cfg.generation).generation is gen
    # Another engine draws other candidates: a changed backend redoes search and eval stages, not training.
    assert _kinds_reading("generation.backend", [cfg]) == {"search", "eval"}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_install():
    with pytest.raises(ConfigError, match="make setup-vllm"):
        load_generator("tiny-random", gen=GenerationConfig(backend="vllm"))


def test_a_process_group_of_one_is_not_a_world():
    # An in-process vLLM engine sets up such a group and may tear it down before psr's next barrier.
    import socket

    from psr.distributed import broadcast, context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        rank, world, barrier = context()
        assert (rank, world) == (0, 1) and barrier is not dist.barrier
        assert broadcast({"a": 1}) == {"a": 1}
    finally:
        dist.destroy_process_group()
