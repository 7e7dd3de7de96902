"""Tree vs sequential rollouts on one engine: `python -m trl_treepo.benchmark`.

For one model and one set of prompts, the same engine samples (a) GRPO's sequential rollouts: `width` independent
completions per prompt of up to `segment_length × depth` tokens, and (b) TreePO's tree rollout with the same number
of leaves, the same length limit and the same sampling parameters. Runs alternate after a warm-up; medians are
reported per mode with the paper's throughput measures (§4.1): trajectories per second (TrajPS) and leaf tokens per
second (TokenPS), plus the tokens the engine actually decoded.

    speedup              = tree TokenPS / sequential TokenPS
    decoded_token_ratio  = tree decoded tokens / sequential decoded tokens
    efficiency           = speedup × decoded_token_ratio
    decode_rate_ratio    = tree decoded tokens per second / sequential decoded tokens per second

A tree can at best save what it does not decode, so `efficiency` near 1 means the per-level overhead is paid for.
Tree leaves run longer than independent samples (budget transfer hands a stopped path's branches to its surviving,
longer siblings), which lifts TokenPS; `decode_rate_ratio` is the engine-side measure free of that effect.
`--json` prints one JSON object on the last line. `--sweep-depths` varies depth at a fixed token budget (the paper's
depth × segment study) and `--plot` draws TokenPS against it. `--train` compares a full TreePOTrainer step with a
GRPOTrainer step at equal leaves, and a TreePOTrainer step with `tree_packed_training` (each shared prefix forwarded
once) against one without: step time, loss forward + backward time, and peak memory (CUDA allocations on a GPU, the
process's peak RSS on a CPU).

`--tools` is the agentic case: problems solved with a calculator tool (`testing.make_tool_dataset`, a tiny model
SFT-warmed to call it), rolled out (a) as GRPOTrainer's tool loop does, every completion running its own calls turn
by turn, and (b) as a tree through tool calls (docs/algorithm.md §8), where a call runs once per node. It adds the tool
calls each mode executed; `--tool-latency` makes every call take that many seconds, as a real tool would.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .sampling import SegmentRequest, TreeSamplingParams
from .tree import grow_trees

DEFAULT_TOOL_MODEL_DIR = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo")) / "bench-tool-model"

DEFAULT_MODEL_DIR = Path(os.environ.get("TRL_TREEPO_CACHE", Path.home() / ".cache" / "trl_treepo")) / "bench-model"


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

    @property
    def trajectories_per_s(self) -> float:
        return self.trajectories / self.wall_s

    @property
    def leaf_tokens_per_s(self) -> float:
        return self.leaf_tokens / self.wall_s


def _trim(ids: Sequence[int], eos_token_ids: frozenset[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_token_ids:
            return list(ids[: position + 1])
    return list(ids)


def run_sequential(engine, prompts, params: TreeSamplingParams) -> RunResult:
    """GRPO's sampling: `width` independent completions per prompt, one engine call."""
    eos = frozenset(params.eos_token_ids)
    started = time.perf_counter()
    outputs = engine.generate(
        [SegmentRequest(list(prompt), params.width, params.max_response_length) for prompt in prompts]
    )
    wall = time.perf_counter() - started
    completions = [_trim(o.token_ids, eos) for branches in outputs for o in branches]
    return RunResult(
        wall_s=wall,
        trajectories=len(completions),
        leaf_tokens=sum(len(c) for c in completions),
        decoded_tokens=sum(len(o.token_ids) for branches in outputs for o in branches),
        engine_calls=1,
        requests=len(prompts),
        early_stop_ratio=sum(len(c) < params.max_response_length for c in completions) / len(completions),
    )


def run_sequential_with_tools(engine, prompts, params: TreeSamplingParams, tools) -> RunResult:
    """GRPOTrainer's tool loop: `width` completions per prompt; each turn that ends with tool calls runs them, appends
    the result and generates the next turn, until no call is left or `max_tool_turns` turns ran (one engine call per
    iteration, over every completion still going)."""
    eos = frozenset(params.eos_token_ids)
    started = time.perf_counter()
    rows = [prompt_index for prompt_index in range(len(prompts)) for _ in range(params.width)]
    completions = [[] for _ in rows]
    policy_tokens = [0] * len(rows)
    states = [tools.root_state(prompt_index) for prompt_index in rows]
    turns = [0] * len(rows)
    decoded = calls = engine_calls = requests = 0
    active = list(range(len(rows)))
    while active:
        budget = [params.max_response_length - len(completions[row]) for row in active]
        outputs = engine.generate(
            [SegmentRequest(list(prompts[rows[row]]) + completions[row], 1, left) for row, left in zip(active, budget)]
        )
        engine_calls, requests = engine_calls + 1, requests + len(active)
        still_going = []
        for row, (output,) in zip(active, outputs):
            decoded += len(output.token_ids)
            turn_ids = _trim(output.token_ids, eos)
            context = list(prompts[rows[row]]) + completions[row]
            completions[row] += turn_ids
            policy_tokens[row] += len(turn_ids)
            if not turn_ids or turn_ids[-1] not in eos:
                continue  # the length limit cut it
            found = tools.find_calls(rows[row], context, turn_ids)
            if found is None or (params.max_tool_turns is not None and turns[row] >= params.max_tool_turns):
                continue
            turn = tools.run(rows[row], states[row], found)
            calls += turn.calls
            if len(completions[row]) + len(turn.token_ids) >= params.max_response_length:
                continue
            completions[row] += turn.token_ids
            states[row], turns[row] = turn.state, turns[row] + 1
            still_going.append(row)
        active = still_going
    wall = time.perf_counter() - started
    return RunResult(
        wall_s=wall,
        trajectories=len(rows),
        leaf_tokens=sum(policy_tokens),
        decoded_tokens=decoded,
        engine_calls=engine_calls,
        requests=requests,
        early_stop_ratio=sum(len(c) < params.max_response_length for c in completions) / len(rows),
        tool_calls=calls,
        path_tool_calls=calls,
    )


def run_tree(engine, prompts, params: TreeSamplingParams, decode, tools=None) -> RunResult:
    started = time.perf_counter()
    rollout = grow_trees(engine, prompts, params, decode, tools)
    wall = time.perf_counter() - started
    leaves = rollout.flat_leaves()
    return RunResult(
        wall_s=wall,
        trajectories=len(leaves),
        leaf_tokens=rollout.stats.leaf_tokens,
        decoded_tokens=rollout.stats.decoded_tokens,
        engine_calls=rollout.stats.engine_calls,
        requests=rollout.stats.requests,
        early_stop_ratio=sum(len(leaf.token_ids) < params.max_response_length for leaf in leaves) / len(leaves),
        tool_calls=rollout.stats.tool_calls,
        path_tool_calls=rollout.stats.sequential_tool_calls,
    )


def _median_result(runs: list[RunResult]) -> dict:
    median = {field: statistics.median(getattr(r, field) for r in runs) for field in asdict(runs[0])}
    median["trajectories_per_s"] = statistics.median(r.trajectories_per_s for r in runs)
    median["leaf_tokens_per_s"] = statistics.median(r.leaf_tokens_per_s for r in runs)
    median["runs"] = len(runs)
    return median


# ------------------------------------------------------------------------------------------------------ engines


class _Backend:
    """Builds a fresh engine per run, so no run inherits another's cache."""

    def __init__(self, args, eos_token_ids, pad_token_id):
        self.args = args
        if args.backend == "vllm":
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
                enforce_eager=args.enforce_eager,
                seed=args.seed,
            )
            self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
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

    def engine(self, reuse_kv_cache: bool = True):
        if self.args.backend == "vllm":
            from .backends.vllm import VLLMColocateEngine

            self.llm.reset_prefix_cache()  # runs start cold: no run reuses another's prefixes
            return VLLMColocateEngine(self.llm, {"temperature": self.args.temperature})
        from .backends.transformers import TransformersSegmentEngine

        return TransformersSegmentEngine(
            self.model, self.generation_config, self.pad_token_id, reuse_kv_cache=reuse_kv_cache
        )

    def seed(self, value: int):
        import torch

        torch.manual_seed(value)


def load_prompts(args, tokenizer) -> list[list[int]]:
    if args.dataset:
        from datasets import load_dataset, load_from_disk

        dataset = load_from_disk(args.dataset) if Path(args.dataset).is_dir() else load_dataset(args.dataset, split="train")
        rows = dataset.select(range(min(args.prompts, len(dataset))))
    else:
        from .testing import make_math_dataset

        rows = make_math_dataset(args.task, size=args.prompts, seed=args.seed + 1000)
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


def tool_prompts(args, tokenizer):
    """The agentic case's prompts (rendered with the calculator tool) and a `ToolExecutor` with TRL's semantics."""
    import functools
    import types

    from trl import GRPOTrainer
    from trl.chat_template_utils import add_response_schema, parse_response

    from .testing import calculate, make_tool_dataset
    from .tools import PromptTools, ToolExecutor

    @functools.wraps(calculate)
    def slow_calculate(expression: str) -> str:
        time.sleep(args.tool_latency)
        return calculate(expression)

    tokenizer = add_response_schema(tokenizer)  # as GRPOTrainer sets it up for tool parsing
    rows = make_tool_dataset(args.prompts, seed=args.seed + 1000)
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], tools=[calculate], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)  # fmt: skip
        for row in rows
    ]
    # GRPOTrainer's own tokenisation of tool results, bound to this tokenizer (it reads no other trainer state).
    trainer_view = types.SimpleNamespace(processing_class=tokenizer, _tokenizer=tokenizer, chat_template=None,
                                         chat_template_kwargs={}, _is_vlm=False)  # fmt: skip

    def suffix_ids(tool_messages):
        return GRPOTrainer._get_tool_suffix_ids(trainer_view, tool_messages)

    def parse(ids, prefix, schema):
        return parse_response(tokenizer, ids, prefix=prefix, tools=schema)

    executor = ToolExecutor([PromptTools([slow_calculate], [calculate]) for _ in prompts], parse, suffix_ids)
    return prompts, executor


def compare(backend: _Backend, prompts, params, decode, args, tools=None) -> dict:
    """Warm up both modes, then alternate sequential and tree runs; medians per mode and their ratios."""
    results = {"sequential": [], "tree": []}
    for repeat in range(args.warmup + args.repeats):
        for mode in ("sequential", "tree"):
            backend.seed(args.seed + repeat)
            engine = backend.engine(reuse_kv_cache=not args.no_kv_reuse)
            if mode == "tree":
                run = run_tree(engine, prompts, params, decode, tools)
            elif tools is not None:
                run = run_sequential_with_tools(engine, prompts, params, tools)
            else:
                run = run_sequential(engine, prompts, params)
            if repeat >= args.warmup:
                results[mode].append(run)
    sequential, tree = _median_result(results["sequential"]), _median_result(results["tree"])
    speedup = tree["leaf_tokens_per_s"] / sequential["leaf_tokens_per_s"]
    decoded_ratio = tree["decoded_tokens"] / sequential["decoded_tokens"]
    decode_rate = [statistics.median(r.decoded_tokens / r.wall_s for r in results[m]) for m in ("sequential", "tree")]
    tool_ratio = {}
    if tools is not None:
        tool_ratio = {
            # calls per trajectory, tree over sequential; and, on the tree's own trajectories, executed over on-path
            "tool_call_ratio": (tree["tool_calls"] / tree["trajectories"])
            / max(sequential["tool_calls"] / sequential["trajectories"], 1e-9),
            "tree_tool_call_sharing": tree["tool_calls"] / max(tree["path_tool_calls"], 1),
        }
    return {
        **tool_ratio,
        "sequential": sequential,
        "tree": tree,
        "speedup": speedup,
        "trajectory_speedup": tree["trajectories_per_s"] / sequential["trajectories_per_s"],
        "decoded_token_ratio": decoded_ratio,
        "efficiency": speedup * decoded_ratio,
        "decode_rate_ratio": decode_rate[1] / decode_rate[0],
    }


# ------------------------------------------------------------------------------------------------ training step


def _train_worker(args) -> dict:
    """One trainer's step times, in its own process (each trainer builds its own vLLM engine)."""
    import tempfile

    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from . import TreePOConfig, TreePOTrainer
    from .testing import make_math_dataset

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started, self.loss_times = [], None, []

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()
            self.loss_times.append(0.0)

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    def timed(function, timer):
        """Adds the time of each call to the current step's loss time (forward + backward of the loss)."""

        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                timer.loss_times[-1] += time.perf_counter() - started

        return wrapper

    def length_reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 13) for c in completions]

    steps = args.warmup + args.repeats
    dataset = make_math_dataset(args.task, size=args.prompts * steps, seed=args.seed)
    common = dict(
        use_cpu=args.device_is_cpu,
        bf16=not args.device_is_cpu,
        per_device_train_batch_size=args.prompts * args.width,
        num_generations=args.width,
        max_steps=steps,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=args.seed,
        use_vllm=args.backend == "vllm",
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_max_model_length=args.max_model_len,
    )
    with tempfile.TemporaryDirectory() as out:
        if args.train_worker == "grpo":
            config = GRPOConfig(out, max_completion_length=args.segment_length * args.depth, **common)
            trainer = GRPOTrainer(args.model, length_reward, args=config, train_dataset=dataset)
            if config.use_vllm:
                from .backends.vllm import engine_runs_on_cpu, sync_weights_by_reload

                if engine_runs_on_cpu():  # TRL's own sync cannot load into vLLM-CPU (see docs/vllm.md)
                    trainer.vllm_generation.sync_weights = lambda: sync_weights_by_reload(trainer.vllm_generation)
        else:
            config = TreePOConfig(
                out,
                tree_segment_length=args.segment_length,
                tree_max_depth=args.depth,
                tree_branching_factor=args.branching,
                tree_initial_divergence=args.initial_divergence,
                tree_packed_training=args.train_worker == "treepo-packed",
                **common,
            )
            trainer = TreePOTrainer(args.model, length_reward, args=config, train_dataset=dataset)
        timer = StepTimes()
        trainer.add_callback(timer)
        trainer.compute_loss = timed(trainer.compute_loss, timer)
        trainer.accelerator.backward = timed(trainer.accelerator.backward, timer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry][args.warmup :]
    result = {
        "step_s": statistics.median(timer.times[args.warmup :]),
        "loss_s": statistics.median(timer.loss_times[args.warmup :]),
        "completion_tokens": statistics.median(e["completions/mean_length"] for e in logs) * args.prompts * args.width,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
    }
    if args.train_worker.startswith("treepo"):
        result["decoded_tokens"] = statistics.median(e["tree/decoded_tokens"] for e in logs)
    if args.train_worker == "treepo-packed":
        result["packed_token_ratio"] = statistics.median(e["tree/packed_token_ratio"] for e in logs)
    return result


def compare_training_steps(argv: list[str]) -> dict:
    """Median wall time of a TreePOTrainer step and a GRPOTrainer step with the same leaves per prompt."""
    import subprocess

    results = {}
    for name in ("grpo", "treepo", "treepo-packed"):
        command = [sys.executable, "-m", "trl_treepo.benchmark", *argv, "--train-worker", name, "--json"]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"The {name} training run failed:\n{finished.stderr[-3000:]}")
        results[name] = json.loads(finished.stdout.strip().splitlines()[-1])
    results["step_speedup"] = results["grpo"]["step_s"] / results["treepo"]["step_s"]
    results["packed_loss_speedup"] = results["treepo"]["loss_s"] / results["treepo-packed"]["loss_s"]
    results["packed_step_speedup"] = results["treepo"]["step_s"] / results["treepo-packed"]["step_s"]
    return results


# ------------------------------------------------------------------------------------------- packed training


# Qwen2.5-0.5B's attention shape (hidden 896, 14 query heads, 2 KV heads, MLP 4864) with few layers and the 8k
# offline vocabulary: the per-token work of a real model, small enough for two CPU cores.
PACKING_MODEL = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864)
PACKING_MODES = ("unpacked", "dense", "tree")


def synthetic_tree_rows(num_prompts: int, width: int, segment_length: int, depth: int, seed: int, vocab: int = 8000):
    """Rows (prompt, completion) of `num_prompts` trees grown by the real sampler on random tokens.

    Early stops follow a policy that answers after a few segments: each segment ends with EOS (at a uniform point)
    with probability 0.06 per segment of depth, up to 0.6, so most leaves stop between a third and two thirds of the
    depth, some at the first segments (fallbacks) and some at the length limit. Prompts are 100–300 tokens.
    """
    import random

    from .testing import ScriptedEngine

    rng = random.Random(seed)
    eos = vocab + 1

    def respond(request, branch, rng):
        segment = (len(request.token_ids) - prompt_lengths[tuple(request.token_ids[:4])]) // segment_length + 1
        tokens = [rng.randrange(10, vocab) for _ in range(request.max_tokens)]
        if rng.random() < min(0.6, 0.06 * segment):
            return tokens[: rng.randint(0, request.max_tokens - 1)] + [eos]
        return tokens

    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(100, 300))] for _ in range(num_prompts)]
    prompt_lengths = {tuple(p[:4]): len(p) for p in prompts}
    params = TreeSamplingParams(width=width, segment_length=segment_length, max_depth=depth, eos_token_ids=(eos,),
                                seed=seed)  # fmt: skip
    rollout = grow_trees(ScriptedEngine(respond, eos_token_id=eos, seed=seed), prompts, params)
    return [(prompts[i], leaf.token_ids) for i, leaves in enumerate(rollout.leaves) for leaf in leaves]


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _packing_worker(args) -> dict:
    """Loss forward + backward of one micro-batch (one tree of `--width` leaves) in one mode, in its own process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from .packing import install_tree_attention, pack_rows

    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=8214, num_hidden_layers=args.layers, max_position_embeddings=32768,
                         tie_word_embeddings=False, **PACKING_MODEL)  # fmt: skip
    model = Qwen2ForCausalLM(config).train()
    add_fused_lm_head(model)
    install_tree_attention()
    # Gradient accumulation 4 over 4 trees: a micro-batch holds one whole tree (tree-aware micro-batches).
    rows = synthetic_tree_rows(4, args.width, args.segment_length, args.depth, args.seed)[: args.width]
    prompt_width = max(len(p) for p, _ in rows)
    width = max(len(c) for _, c in rows)
    ids = torch.zeros(len(rows), prompt_width + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(rows):
        ids[row, prompt_width - len(prompt) : prompt_width + len(completion)] = torch.tensor(prompt + completion)
        mask[row, prompt_width - len(prompt) : prompt_width + len(completion)] = 1
    advantages = torch.randn(len(rows), 1)
    completion_mask = mask[:, prompt_width:].float()

    def loss_of(logps):  # DAPO-style token mean of -A * logp, as TRL's loss on the first pass
        return -(logps * advantages * completion_mask).sum() / completion_mask.sum()

    packed = pack_rows(ids, mask, width)
    if args.packing_worker == "unpacked":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :prompt_width] = -100

        def step():
            return model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, -width:]

    else:
        sequence = packed.sequences[0]
        tree = args.packing_worker == "tree"
        attention = sequence.attention_mask if tree else sequence.tree.dense_mask()
        extra = {"tree_attention": sequence.tree} if tree else {}

        def step():
            output = model(input_ids=sequence.input_ids, attention_mask=attention, position_ids=sequence.position_ids,
                           shift_labels=sequence.shift_labels, fused_lm_head=True, **extra)  # fmt: skip
            return packed.unpack([output.log_probs])

    before = _current_rss_mb()
    started = time.perf_counter()
    loss_of(step()).backward()
    seconds = time.perf_counter() - started
    return {
        "mode": args.packing_worker,
        "loss_s": seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
        "row_tokens": packed.row_tokens,
        "padded_tokens": ids.numel(),  # what the unpacked forward computes: every row padded to the longest
        "unique_tokens": packed.packed_tokens,
        "leaf_tokens": int(completion_mask.sum()),
    }


def compare_packing(argv: list[str], shapes: list[tuple[int, int]], dense_limit: int) -> list[dict]:
    """Each shape (segment length, depth) in every mode, each in a fresh process (peak RSS is per process)."""
    import subprocess

    results = []
    for segment_length, depth in shapes:
        point = {"segment_length": segment_length, "depth": depth}
        for mode in PACKING_MODES:
            if mode == "dense" and point.get("unique_tokens", 0) > dense_limit:
                point[mode] = None  # an L × L mask would not fit: skipped, as the dense path cannot run there
                continue
            command = [sys.executable, "-m", "trl_treepo.benchmark", *argv, "--segment-length", str(segment_length),
                       "--depth", str(depth), "--packing-worker", mode, "--json"]  # fmt: skip
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode != 0:  # killed for memory (the dense mask, or unpacked rows at the largest shapes)
                print(f"{mode} did not run at {depth} × {segment_length} (exit {finished.returncode}): "
                      f"{finished.stderr.strip()[-300:]}", flush=True)  # fmt: skip
                point[mode] = None
                continue
            result = json.loads(finished.stdout.strip().splitlines()[-1])
            point.update({key: result[key] for key in ("row_tokens", "padded_tokens", "unique_tokens")})
            point[mode] = {"loss_s": result["loss_s"], "peak_mb": result["peak_mb"]}
        point["packed_token_ratio"] = point["unique_tokens"] / point["row_tokens"]
        point["ideal_speedup"] = 1 / point["packed_token_ratio"]
        for mode in ("dense", "tree"):
            if point[mode] is not None and point["unpacked"] is not None:
                point[f"{mode}_speedup"] = point["unpacked"]["loss_s"] / point[mode]["loss_s"]
        print(f"{depth:2d} × {segment_length:3d}: {point['row_tokens']:6d} row tokens, {point['unique_tokens']:6d} "
              f"unique (ratio {point['packed_token_ratio']:.2f}, ideal {point['ideal_speedup']:.2f}x) | "
              + " | ".join(f"{m} {point[m]['loss_s']:.1f} s {point[m]['peak_mb']:.0f} MB" if point[m] else f"{m} -"
                           for m in PACKING_MODES), flush=True)  # fmt: skip
        results.append(point)
    return results


def _plot_packing(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"unpacked": ("unpacked rows", "o"), "dense": ("dense-mask packing", "s"), "tree": ("tree attention", "^")}
    for mode, (label, marker) in styles.items():
        measured = sorted((p["unique_tokens"], p[mode]) for p in points if p[mode] is not None)
        # unpacked rows cost what their padding costs, not what the tree holds: points, not a curve
        line = "none" if mode == "unpacked" else "-"
        for axis, value in ((axes[0], lambda m: m["peak_mb"] / 1024), (axes[1], lambda m: m["loss_s"])):
            axis.plot([u for u, _ in measured], [value(m) for _, m in measured], marker=marker, linestyle=line,
                      label=label)
    axes[0].set_ylabel("peak memory of the step (GB)")
    axes[1].set_ylabel("loss forward + backward (s)")
    for axis in axes:
        axis.set_xlabel("unique tokens of the tree (packed length)")
        axis.set_ylim(bottom=0)
        axis.set_xlim(left=0)
        axis.legend(fontsize=8)
    figure.suptitle("One micro-batch (one tree of 16 leaves), Qwen2.5-0.5B attention shape", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------- cli


def _table(report: dict) -> str:
    rows = [
        ("wall time (s)", "wall_s", "{:.2f}"),
        ("trajectories", "trajectories", "{:.0f}"),
        ("leaf tokens", "leaf_tokens", "{:.0f}"),
        ("decoded tokens", "decoded_tokens", "{:.0f}"),
        ("engine calls", "engine_calls", "{:.0f}"),
        ("requests", "requests", "{:.0f}"),
        ("early-stopped leaves", "early_stop_ratio", "{:.0%}"),
        ("TrajPS", "trajectories_per_s", "{:.2f}"),
        ("TokenPS", "leaf_tokens_per_s", "{:.1f}"),
    ]
    if "tool_call_ratio" in report:
        rows += [("tool calls executed", "tool_calls", "{:.0f}"), ("tool calls on paths", "path_tool_calls", "{:.0f}")]
    lines = [f"{'':24}{'sequential':>14}{'tree':>14}"]
    for label, key, fmt in rows:
        lines.append(f"{label:24}{fmt.format(report['sequential'][key]):>14}{fmt.format(report['tree'][key]):>14}")
    lines.append(
        f"speedup (TokenPS) {report['speedup']:.2f}x   TrajPS {report['trajectory_speedup']:.2f}x   "
        f"decoded-token ratio {report['decoded_token_ratio']:.3f}   efficiency {report['efficiency']:.2f}   "
        f"decode-rate ratio {report['decode_rate_ratio']:.2f}"
    )
    if "tool_call_ratio" in report:
        lines.append(
            f"tool calls per trajectory, tree / sequential {report['tool_call_ratio']:.3f}   "
            f"tree executed / on its paths {report['tree_tool_call_sharing']:.3f}"
        )
    return "\n".join(lines)


def _plot(sweep: list[dict], sequential_tokens_per_s: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['depth']}×{p['segment_length']}" for p in sweep]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(labels, [p["tree"]["leaf_tokens_per_s"] for p in sweep], marker="o", label="tree (TreePO)")
    axis.axhline(sequential_tokens_per_s, color="grey", linestyle="--", label="sequential (GRPO)")
    axis.set_xlabel("depth × segment length (fixed token budget)")
    axis.set_ylabel("TokenPS (leaf tokens / s)")
    axis.set_ylim(bottom=0)
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_treepo.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--model", help=f"model path or id (default: the warmed-up tiny model in {DEFAULT_MODEL_DIR})")
    parser.add_argument("--task", default="gsm_symbolic", help="reasoning-gym task for prompts")
    parser.add_argument("--dataset", help="a dataset name or saved directory with a `prompt` column, instead of --task")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="leaves per prompt (num_generations); paper: 16")
    parser.add_argument("--segment-length", type=int, default=32, help="paper: 512")
    parser.add_argument("--depth", type=int, default=8, help="paper: 14")
    parser.add_argument("--branching", type=int, default=2, help="paper: 2")
    parser.add_argument("--initial-divergence", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--no-kv-reuse", action="store_true", help="transformers: re-read prefixes at every level")
    parser.add_argument("--block-size", type=int, help="vLLM KV block size (default: 32 on CPU, engine default else)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--sweep-depths", help="comma-separated depths at a fixed budget of segment-length × depth")
    parser.add_argument("--plot", help="PNG path for the TokenPS-vs-depth plot of --sweep-depths")
    parser.add_argument("--train", action="store_true", help="also compare a TreePOTrainer step with a GRPOTrainer step")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--tools", action="store_true", help="the agentic case: calculator problems, tool calls in "
                        "rollouts (default model: a tiny model warmed to call the tool)")
    parser.add_argument("--tool-latency", type=float, default=0.05, help="--tools: seconds each tool call takes")
    parser.add_argument("--max-tool-turns", type=int, default=3, help="--tools: max_tool_calling_iterations")
    parser.add_argument("--train-worker", choices=["grpo", "treepo", "treepo-packed"], help=argparse.SUPPRESS)
    parser.add_argument("--packing", help="compare the packed-training paths on synthetic trees of these shapes, "
                        "comma-separated depth×segment-length (e.g. 4x256,8x512,14x512); skips the rollout benchmark")
    parser.add_argument("--layers", type=int, default=2, help="--packing: layers of the Qwen2.5-0.5B-shaped model")
    parser.add_argument("--dense-limit", type=int, default=30000,
                        help="--packing: skip the dense-mask path above this many unique tokens")
    parser.add_argument("--packing-worker", choices=PACKING_MODES, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from transformers import AutoTokenizer

    if args.packing_worker:
        result = _packing_worker(args)
        print(json.dumps(result))
        return result
    if args.packing:  # synthetic trees on a random model: no rollout, no warmed-up model
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.packing.split(",")]
        worker_argv = ["--layers", str(args.layers), "--width", str(args.width), "--seed", str(args.seed)]
        points = compare_packing(worker_argv, [(length, depth) for depth, length in shapes], args.dense_limit)
        report = {"packing": points, "setup": {"layers": args.layers, "width": args.width, "seed": args.seed,
                                               "device": f"cpu ({os.cpu_count()} cores)", **PACKING_MODEL}}  # fmt: skip
        if args.plot:
            _plot_packing(points, args.plot)
        if args.json:
            print(json.dumps(report))
        return report
    if args.model is None:
        from .testing import make_warm_model

        if args.tools:
            args.model = make_warm_model(DEFAULT_TOOL_MODEL_DIR, warm="tool-calls", steps=300)
        else:
            args.model = make_warm_model(DEFAULT_MODEL_DIR)
        argv += ["--model", args.model]
    args.device_is_cpu = not torch.cuda.is_available()
    if args.train_worker:
        result = _train_worker(args)
        print(json.dumps(result))
        return result
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eos_token_ids = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        eos_token_ids.append(tokenizer.pad_token_id)
    tools = None
    if args.tools:
        prompts, tools = tool_prompts(args, tokenizer)
    else:
        prompts = load_prompts(args, tokenizer)
    backend = _Backend(args, eos_token_ids, tokenizer.pad_token_id)
    params = sampling_params(args, eos_token_ids, args.depth, args.segment_length)

    report = compare(backend, prompts, params, tokenizer.decode, args, tools)
    report["setup"] = {
        "backend": args.backend,
        "model": str(args.model),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "prompts": len(prompts),
        "width": args.width,
        "segment_length": args.segment_length,
        "depth": args.depth,
        "branching": args.branching,
        "temperature": args.temperature,
        "kv_reuse": args.backend == "vllm" or not args.no_kv_reuse,
        "block_size": backend.block_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    if args.tools:
        report["setup"].update(tool_latency_s=args.tool_latency, max_tool_turns=args.max_tool_turns)
    print(_table(report), flush=True)

    if args.sweep_depths:
        budget = args.segment_length * args.depth
        sweep = []
        for depth in (int(d) for d in args.sweep_depths.split(",")):
            if budget % depth:
                raise SystemExit(f"--sweep-depths: {depth} does not divide the token budget {budget}.")
            point = compare(backend, prompts, sampling_params(args, eos_token_ids, depth, budget // depth), tokenizer.decode, args)
            sweep.append({"depth": depth, "segment_length": budget // depth, **point})
            print(f"depth {depth:3d} × {budget // depth:4d}: speedup {point['speedup']:.2f}x, "
                  f"decoded-token ratio {point['decoded_token_ratio']:.3f}", flush=True)
        report["sweep"] = sweep
        if args.plot:
            sequential = statistics.median(p["sequential"]["leaf_tokens_per_s"] for p in sweep)
            _plot(sweep, sequential, args.plot, f"{args.backend}, {report['setup']['device']}, width {args.width}")

    if args.train:
        del backend  # free the rollout engine before the trainers build theirs
        report["train"] = compare_training_steps([a for a in argv if a not in ("--train", "--json")])
        train = report["train"]
        print(f"training step: GRPO {train['grpo']['step_s']:.2f} s, "
              f"TreePO {train['treepo']['step_s']:.2f} s ({train['step_speedup']:.2f}x), "
              f"TreePO packed {train['treepo-packed']['step_s']:.2f} s", flush=True)
        print(f"loss forward+backward: TreePO {train['treepo']['loss_s']:.2f} s, packed "
              f"{train['treepo-packed']['loss_s']:.2f} s ({train['packed_loss_speedup']:.2f}x; packed/leaf tokens "
              f"{train['treepo-packed']['packed_token_ratio']:.2f}); peak memory "
              f"{train['treepo']['peak_memory_mb']:.0f} → {train['treepo-packed']['peak_memory_mb']:.0f} MB",
              flush=True)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
