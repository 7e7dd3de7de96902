"""Sequential vs tree rollouts on one engine (paper §4.1): GRPO's `width` independent completions per prompt against
TreePO's tree with as many leaves, the same length limit and sampling, grown by each of the rollout drivers
(`--compare-schedules`); the tree's engine steps split by where they go (`step_decomposition`); and the depth ×
segment sweep at a fixed token budget (paper §4.3)."""

from __future__ import annotations

import statistics
import time

from ..sampling import SegmentRequest, TreeSamplingParams
from ..scheduling import LevelBatches, ThreadedStream
from ..tree import TreeRollout, grow_trees
from .harness import Backend, RunResult, median_result, sampling_params, trim_at_eos
from .tools import run_sequential_with_tools

# The tree drivers `--compare-schedules` runs, by backend; the first is the default (`TreePOConfig`'s
# `tree_rollout_schedule="auto"`), the others what it replaced or could replace.
SCHEDULES = {
    "vllm": {
        "per_tree": "per tree, first children continue their parent's request (default)",
        "level": "level by level, first children continue their parent's request",
        "per_tree_segments": "per tree, a request per segment (the per-tree schedule before)",
        "level_generate": "level by level, one LLM.generate per depth (the default before)",
    },
    "vllm-server": {
        "level": "level by level, one request per depth (default)",
        "per_tree": "per tree, each tree level its own request, 32 in flight",
    },
    "transformers": {
        "level": "level by level, one generate per depth (default)",
        "per_tree": "per tree, one generate per tree level",
    },
}


def run_sequential(engine, prompts, params: TreeSamplingParams) -> RunResult:
    """GRPO's sampling: `width` independent completions per prompt, one engine call."""
    eos = frozenset(params.eos_token_ids)
    started = time.perf_counter()
    outputs = engine.generate(
        [SegmentRequest(list(prompt), params.width, params.max_response_length) for prompt in prompts]
    )
    wall = time.perf_counter() - started
    completions = [trim_at_eos(o.token_ids, eos) for branches in outputs for o in branches]
    return RunResult(
        wall_s=wall,
        trajectories=len(completions),
        leaf_tokens=sum(len(c) for c in completions),
        decoded_tokens=sum(len(o.token_ids) for branches in outputs for o in branches),
        engine_calls=1,
        requests=len(prompts),
        early_stop_ratio=sum(len(c) < params.max_response_length for c in completions) / len(completions),
        longest_path=max(len(c) for c in completions),
    )


def run_tree(engine, prompts, params: TreeSamplingParams, decode, tools=None, barrier: bool = False) -> RunResult:
    started = time.perf_counter()
    rollout = grow_trees(engine, prompts, params, decode, tools, barrier)
    wall = time.perf_counter() - started
    leaves = rollout.flat_leaves()
    return RunResult(
        wall_s=wall,
        trajectories=len(leaves),
        leaf_tokens=rollout.stats.leaf_tokens,
        decoded_tokens=rollout.stats.decoded_tokens,
        engine_calls=rollout.stats.engine_calls,
        requests=getattr(engine, "requests", rollout.stats.requests),
        early_stop_ratio=sum(len(leaf.token_ids) < params.max_response_length for leaf in leaves) / len(leaves),
        tool_calls=rollout.stats.tool_calls,
        path_tool_calls=rollout.stats.sequential_tool_calls,
        engine_steps=rollout.stats.engine_steps,
        longest_path=max((len(leaf.token_ids) for leaf in leaves if not leaf.from_fallback), default=0),
        **step_decomposition(rollout),
    )


def step_decomposition(rollout: TreeRollout) -> dict:
    """Where the tree's engine steps go, along the tree that finished last (`levels` on the engine's clock).

    - `deepest_path`: tokens of that tree's longest main-tree leaf (not from a fallback): at one token per step, the
      steps its main tree needs at least;
    - `own_level_barrier`: its levels' longest segments beyond that path (a level waits for its longest segment);
    - `request_latency`: steps its main levels took beyond decoding their longest segment, one token per step:
      new requests waiting for their first token (prefill, scheduling); negative where continued requests had
      decoded ahead;
    - `waits_on_other_trees`: its decoded levels held back for other trees (the level-synchronous barrier);
    - `fallback_rounds`: the steps of its levels after its main paths had all stopped (paper §2.5);
    - `other_steps`: the rest (steps before its first level, between levels, after it finished).
    """
    levels, steps = rollout.levels, rollout.stats.engine_steps
    if not levels or not steps:  # an engine that does not count its steps (one `LLM.generate` per level)
        return {}
    last = max(levels, key=lambda level: (level.returned, level.decoded)).tree
    own = sorted((level for level in levels if level.tree == last), key=lambda level: level.submitted)
    main = [level for level in own if not level.fallback]
    main_leaves = [leaf for leaf in rollout.leaves[last] if not leaf.from_fallback]
    deepest = max((len(leaf.token_ids) for leaf in main_leaves), default=0)
    decoded = sum(level.longest_segment for level in main)
    split = {
        "deepest_path": deepest,
        "own_level_barrier": decoded - deepest,
        "request_latency": sum(level.decoded - level.submitted for level in main) - decoded,
        "waits_on_other_trees": sum(level.returned - level.decoded for level in main),
        "fallback_rounds": sum(level.returned - level.submitted for level in own if level.fallback),
    }
    split["other_steps"] = steps - sum(split.values())
    return split


class OneGroupPerCall:
    """Per-tree expansion on an engine without continuous batching (transformers' `generate`): each tree level is
    its own call, in submission order. What `--compare-schedules` measures for the transformers backend."""

    def __init__(self, engine):
        self.engine, self.pending, self.next_ticket = engine, [], 0

    @property
    def steps(self):
        return getattr(self.engine, "steps", None)

    def submit(self, requests) -> int:
        self.next_ticket += 1
        self.pending.append((self.next_ticket, list(requests)))
        return self.next_ticket

    def wait(self):
        ticket, requests = self.pending.pop(0)
        return [(ticket, self.engine.generate(requests))]

    def close(self) -> None:
        self.pending = []


def grow_with(backend: Backend, schedule: str, prompts, params, decode, tools, args) -> RunResult:
    """One tree rollout with the driver `schedule` (`SCHEDULES`) on a fresh engine."""
    if backend.args.backend == "vllm":
        engine = backend.engine(continue_branches=schedule in ("per_tree", "level"))
        if schedule == "level_generate":
            return run_tree(LevelBatches(engine), prompts, params, decode, tools)
        return run_tree(engine, prompts, params, decode, tools, barrier=schedule == "level")
    engine = backend.engine(reuse_kv_cache=not args.no_kv_reuse)
    if backend.args.backend == "vllm-server":  # as the trainer drives a server (`tree_server_max_concurrency`)
        return run_tree(LevelBatches(engine) if schedule == "level" else ThreadedStream(engine, 32), prompts, params,
                        decode, tools)  # fmt: skip
    return run_tree(LevelBatches(engine) if schedule == "level" else OneGroupPerCall(engine), prompts, params, decode,
                    tools)  # fmt: skip


def schedules_of(args) -> list[str]:
    """The tree drivers to run: the backend's default, and with `--compare-schedules` the others beside it."""
    schedules = list(SCHEDULES[args.backend])
    return schedules if args.compare_schedules else schedules[:1]


def _ratios(sequential_runs: list[RunResult], tree_runs: list[RunResult]) -> dict:
    sequential, tree = median_result(sequential_runs), median_result(tree_runs)
    decoded_ratio = tree["decoded_tokens"] / sequential["decoded_tokens"]
    speedup = tree["leaf_tokens_per_s"] / sequential["leaf_tokens_per_s"]
    trajectory_speedup = tree["trajectories_per_s"] / sequential["trajectories_per_s"]
    decode_rate = [statistics.median(r.decoded_tokens / r.wall_s for r in runs) for runs in (sequential_runs, tree_runs)]
    # Each repeat's tree against the sequential run beside it: the spread this machine's noise gives the median.
    paired = [s.wall_s / t.wall_s for s, t in zip(sequential_runs, tree_runs)]
    return {
        "trajectory_speedup_range": (min(paired), max(paired)),
        "tree": tree,
        "speedup": speedup,
        "trajectory_speedup": trajectory_speedup,
        "decoded_token_ratio": decoded_ratio,
        "efficiency": speedup * decoded_ratio,
        "decode_rate_ratio": decode_rate[1] / decode_rate[0],
        # a tree can be at most 1 / (decoded-token ratio) faster than sequential sampling at an equal decode rate
        "trajectory_speedup_limit": 1 / decoded_ratio,
        "trajectory_speedup_of_limit": trajectory_speedup * decoded_ratio,
    }


def compare(backend: Backend, prompts, params, decode, args, tools=None) -> dict:
    """Warm up every mode, then alternate sequential and tree runs (each tree schedule in turn); medians per mode and
    their ratios. The first schedule's are the report's top-level `tree` and ratios; every schedule's are under
    `schedules`."""
    schedules = schedules_of(args)
    modes = ["sequential", *schedules]
    results = {mode: [] for mode in modes}
    for repeat in range(args.warmup + args.repeats):
        for mode in modes:
            backend.seed(args.seed + repeat)
            steps_before, step_s_before = backend.engine_steps, backend.engine_step_s
            if mode != "sequential":
                run = grow_with(backend, mode, prompts, params, decode, tools, args)
            elif tools is not None:
                run = run_sequential_with_tools(backend.engine(), prompts, params, tools)
            else:
                run = run_sequential(backend.engine(), prompts, params)
            if args.backend == "vllm":
                run.engine_steps = backend.engine_steps - steps_before
                run.engine_step_s = backend.engine_step_s - step_s_before
            if repeat >= args.warmup:
                results[mode].append(run)
    sequential = median_result(results["sequential"])
    per_schedule = {schedule: _ratios(results["sequential"], results[schedule]) for schedule in schedules}
    tool_ratio = {}
    if tools is not None:
        tree = per_schedule[schedules[0]]["tree"]
        tool_ratio = {
            # calls per trajectory, tree over sequential; and, on the tree's own trajectories, executed over on-path
            "tool_call_ratio": (tree["tool_calls"] / tree["trajectories"])
            / max(sequential["tool_calls"] / sequential["trajectories"], 1e-9),
            "tree_tool_call_sharing": tree["tool_calls"] / max(tree["path_tool_calls"], 1),
        }
    return {**tool_ratio, "sequential": sequential, **per_schedule[schedules[0]], "schedule": schedules[0],
            "schedules": per_schedule}  # fmt: skip


def sweep_depths(backend: Backend, prompts, eos_token_ids, decode, args) -> list[dict]:
    """`compare` at each depth of `--sweep-depths`, the segment length chosen so that depth × length stays fixed."""
    budget = args.segment_length * args.depth
    sweep = []
    for depth in (int(d) for d in args.sweep_depths.split(",")):
        if budget % depth:
            raise SystemExit(f"--sweep-depths: {depth} does not divide the token budget {budget}.")
        point = compare(backend, prompts, sampling_params(args, eos_token_ids, depth, budget // depth), decode, args)
        sweep.append({"depth": depth, "segment_length": budget // depth, **point})
        for schedule, ratios in point["schedules"].items():
            print(f"depth {depth:3d} × {budget // depth:4d}, {schedule:8}: speedup {ratios['speedup']:.2f}x, "
                  f"TrajPS {ratios['trajectory_speedup']:.2f}x of {ratios['trajectory_speedup_limit']:.2f}x, "
                  f"decoded-token ratio {ratios['decoded_token_ratio']:.3f}, "
                  f"decode-rate ratio {ratios['decode_rate_ratio']:.2f}", flush=True)
    return sweep


def plot_sweep(sweep: list[dict], sequential_tokens_per_s: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['depth']}×{p['segment_length']}" for p in sweep]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for schedule in sweep[0]["schedules"]:
        tokens_per_s = [p["schedules"][schedule]["tree"]["leaf_tokens_per_s"] for p in sweep]
        axis.plot(labels, tokens_per_s, marker="o", label=f"tree (TreePO), {schedule.replace('_', ' ')}")
    axis.axhline(sequential_tokens_per_s, color="grey", linestyle="--", label="sequential (GRPO)")
    axis.set_xlabel("depth × segment length (fixed token budget)")
    axis.set_ylabel("TokenPS (leaf tokens / s)")
    axis.set_ylim(bottom=0)
    axis.set_title(title, fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


