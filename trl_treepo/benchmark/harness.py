"""What every benchmark shares: run results and their medians, engines built fresh per run, prompts, sampling
parameters, and worker processes (a benchmark that measures memory or builds its own engine runs each case in a fresh
`python -m trl_treepo.benchmark` process)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from ..sampling import TreeSamplingParams

CACHE = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo"))
DEFAULT_MODEL_DIR = CACHE / "bench-model"
DEFAULT_TOOL_MODEL_DIR = CACHE / "bench-tool-model"


@dataclass
class RunResult:
    wall_s: float
    trajectories: int
    leaf_tokens: int
    decoded_tokens: int
    engine_calls: int
    requests: int
    early_stop_ratio: float  # leaves that ended before the length limit
    tool_calls: int = 0  # executed
    path_tool_calls: int = 0  # on the trajectories' paths: what running each trajectory on its own executes
    engine_steps: int = 0  # vLLM: `LLMEngine.step` calls, each one decoding step of the running batch
    engine_step_s: float = 0.0  # vLLM: wall time inside those calls; the rest of `wall_s` is the host's own work
    longest_path: int = 0  # tokens of the longest completion (sequential) or main-tree leaf (tree)
    # the tree's steps, split (see `rollout.step_decomposition`); 0 for sequential runs
    deepest_path: int = 0
    own_level_barrier: int = 0
    request_latency: int = 0
    waits_on_other_trees: int = 0
    fallback_rounds: int = 0
    other_steps: int = 0

    @property
    def trajectories_per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def leaf_tokens_per_s(self) -> float:
        return self.leaf_tokens / self.wall_s


def trim_at_eos(ids: Sequence[int], eos_token_ids: frozenset[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return list(ids[: position + 1])
    return list(ids)


# The parts of a tree's engine steps (`rollout.step_decomposition`): they add up within one run, so they are taken
# from one run, not each part's median.
STEP_PARTS = ("deepest_path", "own_level_barrier", "request_latency", "waits_on_other_trees", "fallback_rounds",
              "other_steps")  # fmt: skip


def median_result(runs: list[RunResult]) -> dict:
    median = {field: statistics.median(getattr(r, field) for r in runs) for field in asdict(runs[0])}
    middle = sorted(runs, key=lambda r: r.engine_steps)[(len(runs) - 1) // 2]  # the run of the (lower) median steps
    median.update({part: getattr(middle, part) for part in STEP_PARTS})
    median["trajectories_per_s"] = statistics.median(r.trajectories_per_s for r in runs)
    median["leaf_tokens_per_s"] = statistics.median(r.leaf_tokens_per_s for r in runs)
    median["runs"] = len(runs)
    return median



# ------------------------------------------------------------------------------------------------------ engines


class Backend:
    """Builds a fresh engine per run, so no run inherits another's cache."""

    def __init__(self, args, eos_token_ids, pad_token_id):
        self.args = args
        if args.backend == "vllm":
            # In-process, as TRL's colocate mode runs it (`distributed_executor_backend="external_launcher"` turns
            # vLLM's multiprocessing off): the engine steps when the rollout asks, with no engine process running
            # ahead of it; and TRL's batch limit and logprob mode.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            from vllm import LLM
            from vllm.platforms import current_platform

            block_size = args.block_size
            if block_size is None and current_platform.is_cpu():
                block_size = 32  # vLLM-CPU's default 128-token blocks share little of a short tree
            self.llm = LLM(
                model=args.model,
                dtype=args.dtype,
                enable_prefix_caching=True,
                block_size=block_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_model_len,
                max_num_batched_tokens=4096,
                logprobs_mode="processed_logprobs",
                enforce_eager=args.enforce_eager,
                seed=args.seed,
            )
            self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
            self.engine_steps, self.engine_step_s = 0, 0.0
            step = self.llm.llm_engine.step

            def counted_step():
                started = time.perf_counter()
                try:
                    return step()
                finally:
                    self.engine_steps += 1
                    self.engine_step_s += time.perf_counter() - started

            self.llm.llm_engine.step = counted_step
        elif args.backend == "vllm-server":
            import requests

            from ..testing import start_vllm_server

            block_size = 32 if args.block_size is None else args.block_size  # as the in-process engine on a CPU
            self.server, self.url = start_vllm_server(args.model, max_model_len=args.max_model_len,
                                                      gpu_memory_utilization=args.gpu_memory_utilization,
                                                      dtype=args.dtype, block_size=block_size)  # fmt: skip
            self.client = SimpleNamespace(base_url=self.url, session=requests.Session(), model=args.model)
            self.block_size = block_size
            self.engine_steps, self.engine_step_s = 0, 0.0
        else:
            import torch
            from transformers import AutoModelForCausalLM, GenerationConfig

            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
            self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
            self.generation_config = GenerationConfig(
                do_sample=True,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=list(eos_token_ids),
                pad_token_id=pad_token_id,
            )
            self.pad_token_id = pad_token_id
            self.block_size = None
            self.engine_steps, self.engine_step_s = 0, 0.0

    def engine(self, reuse_kv_cache: bool = True, continue_branches: bool = True):
        if self.args.backend == "vllm":
            from ..backends.vllm import VLLMColocateEngine

            self.llm.reset_prefix_cache()  # runs start cold: no run reuses another's prefixes
            return VLLMColocateEngine(self.llm, {"temperature": self.args.temperature}, continue_branches)
        if self.args.backend == "vllm-server":
            from ..backends.vllm import VLLMServerEngine

            self.client.session.post(f"{self.url}/reset_prefix_cache").raise_for_status()  # runs start cold
            return VLLMServerEngine(self.client, {"temperature": self.args.temperature})
        from ..backends.transformers import TransformersSegmentEngine

        return TransformersSegmentEngine(
            self.model, self.generation_config, self.pad_token_id, reuse_kv_cache=reuse_kv_cache
        )

    def close(self) -> None:
        """Stop the server a `vllm-server` backend started."""
        if getattr(self, "server", None) is not None:
            self.server.terminate()
            self.server.wait(timeout=60)
            self.server = None

    def seed(self, value: int):
        import torch

        torch.manual_seed(value)


def task_dataset(task: str, size: int, seed: int):
    """`size` problems of a reasoning-gym `task`, or of `synthetic` sums (no reasoning-gym needed)."""
    from ..testing import make_math_dataset, make_synthetic_dataset

    if task == "synthetic":
        return make_synthetic_dataset(size, seed)
    return make_math_dataset(task, size=size, seed=seed)


def load_prompts(args, tokenizer) -> list[list[int]]:
    if args.dataset:
        from datasets import load_dataset, load_from_disk

        dataset = load_from_disk(args.dataset) if Path(args.dataset).is_dir() else load_dataset(args.dataset, split="train")
        rows = dataset.select(range(min(args.prompts, len(dataset))))
    else:
        rows = task_dataset(args.task, args.prompts, args.seed + 1000)
    prompts = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompts.append(tokenizer(prompt)["input_ids"])
        else:
            prompts.append(
                tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            )
    return prompts


def sampling_params(args, eos_token_ids, depth: int, segment_length: int) -> TreeSamplingParams:
    return TreeSamplingParams(
        width=args.width,
        segment_length=segment_length,
        max_depth=depth,
        branching_factor=args.branching,
        initial_divergence=args.initial_divergence,
        eos_token_ids=tuple(eos_token_ids),
        seed=args.seed,
        max_tool_turns=args.max_tool_turns if args.tools else None,
    )



# ---------------------------------------------------------------------------------------------- worker processes


def run_worker(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m trl_treepo.benchmark *argv --json` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "trl_treepo.benchmark", *argv, "--json"], capture_output=True,
                          text=True)  # fmt: skip


def worker_result(finished: subprocess.CompletedProcess) -> dict:
    """The JSON object a worker printed on its last line."""
    return json.loads(finished.stdout.strip().splitlines()[-1])
