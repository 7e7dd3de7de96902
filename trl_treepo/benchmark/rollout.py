"""Sequential vs tree rollouts on one engine (paper §4.1): GRPO's `width` independent completions per prompt against
TreePO's tree with as many leaves, the same length limit and sampling; and the depth × segment sweep at a fixed token
budget (paper §4.3)."""

from __future__ import annotations

import statistics
import time

from ..sampling import SegmentRequest, TreeSamplingParams
from ..tree import grow_trees
from .harness import Backend, RunResult, median_result, sampling_params, trim_at_eos
from .tools import run_sequential_with_tools


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



def compare(backend: Backend, prompts, params, decode, args, tools=None) -> dict:
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
    sequential, tree = median_result(results["sequential"]), median_result(results["tree"])
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


def sweep_depths(backend: Backend, prompts, eos_token_ids, decode, args) -> list[dict]:
    """`compare` at each depth of `--sweep-depths`, the segment length chosen so that depth × length stays fixed."""
    budget = args.segment_length * args.depth
    sweep = []
    for depth in (int(d) for d in args.sweep_depths.split(",")):
        if budget % depth:
            raise SystemExit(f"--sweep-depths: {depth} does not divide the token budget {budget}.")
        point = compare(backend, prompts, sampling_params(args, eos_token_ids, depth, budget // depth), decode, args)
        sweep.append({"depth": depth, "segment_length": budget // depth, **point})
        print(f"depth {depth:3d} × {budget // depth:4d}: speedup {point['speedup']:.2f}x, "
              f"decoded-token ratio {point['decoded_token_ratio']:.3f}", flush=True)
    return sweep


def plot_sweep(sweep: list[dict], sequential_tokens_per_s: float, path: str, title: str) -> None:
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


