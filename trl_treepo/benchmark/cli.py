"""`python -m trl_treepo.benchmark`: the command line of every benchmark (see the package docstring for what each
measures)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from . import __doc__ as PACKAGE_DOC
from .harness import DEFAULT_MODEL_DIR, DEFAULT_TOOL_MODEL_DIR, Backend, load_prompts, sampling_params
from .packing import PACKING_MODES, PACKING_SHAPES, compare_packing, packing_worker, plot_packing
from .rollout import compare, plot_sweep, sweep_depths
from .tools import tool_prompts
from .training import PHASES, TRAINERS, compare_training_steps, train_worker, trainers_of


def rollout_table(report: dict) -> str:
    rows = [
        ("wall time (s)", "wall_s", "{:.2f}"),
        ("trajectories", "trajectories", "{:.0f}"),
        ("leaf tokens", "leaf_tokens", "{:.0f}"),
        ("decoded tokens", "decoded_tokens", "{:.0f}"),
        ("engine calls", "engine_calls", "{:.0f}"),
        ("engine steps", "engine_steps", "{:.0f}"),
        ("  in engine steps (s)", "engine_step_s", "{:.2f}"),
        ("engine requests", "requests", "{:.0f}"),
        ("longest path", "longest_path", "{:.0f}"),
        ("steps: deepest path", "deepest_path", "{:.0f}"),
        ("  own level barrier", "own_level_barrier", "{:.0f}"),
        ("  request latency", "request_latency", "{:.0f}"),
        ("  waits on other trees", "waits_on_other_trees", "{:.0f}"),
        ("  fallback rounds", "fallback_rounds", "{:.0f}"),
        ("  other", "other_steps", "{:.0f}"),
        ("early-stopped leaves", "early_stop_ratio", "{:.0%}"),
        ("TrajPS", "trajectories_per_s", "{:.2f}"),
        ("TokenPS", "leaf_tokens_per_s", "{:.1f}"),
    ]
    if "tool_call_ratio" in report:
        rows += [("tool calls executed", "tool_calls", "{:.0f}"), ("tool calls on paths", "path_tool_calls", "{:.0f}")]
    schedules = report["schedules"]
    columns = [("sequential", report["sequential"])] + [(s, r["tree"]) for s, r in schedules.items()]
    lines = [f"{'':24}" + "".join(f"{name:>18}" for name, _ in columns)]
    for label, key, fmt in rows:
        lines.append(f"{label:24}" + "".join(f"{fmt.format(result[key]):>18}" for _, result in columns))
    for schedule, ratios in schedules.items():
        lines.append(
            f"{schedule:18}: speedup (TokenPS) {ratios['speedup']:.2f}x   TrajPS {ratios['trajectory_speedup']:.2f}x "
            f"(repeats {ratios['trajectory_speedup_range'][0]:.2f}-{ratios['trajectory_speedup_range'][1]:.2f}) "
            f"(limit {ratios['trajectory_speedup_limit']:.2f}x: {ratios['trajectory_speedup_of_limit']:.2f} of it)   "
            f"decoded-token ratio {ratios['decoded_token_ratio']:.3f}   efficiency {ratios['efficiency']:.2f}   "
            f"decode-rate ratio {ratios['decode_rate_ratio']:.2f}"
        )
    if "tool_call_ratio" in report:
        lines.append(
            f"tool calls per trajectory, tree / sequential {report['tool_call_ratio']:.3f}   "
            f"tree executed / on its paths {report['tree_tool_call_sharing']:.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trl_treepo.benchmark",
        description=PACKAGE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=["transformers", "vllm", "vllm-server"], default="transformers",
                        help="vllm: an in-process engine, as TRL's colocate mode; vllm-server: a `vllm serve` started "
                        "on loopback, driven over HTTP as in server mode (rollouts only)")
    parser.add_argument("--model", help=f"model path or id (default: the warmed-up tiny model in {DEFAULT_MODEL_DIR})")
    parser.add_argument("--task", default="gsm_symbolic",
                        help="reasoning-gym task for prompts, or `synthetic` (two-number sums, no reasoning-gym)")
    parser.add_argument("--dataset", help="a dataset name or saved directory with a `prompt` column, instead of --task")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="leaves per prompt (num_generations); paper: 16")
    parser.add_argument("--segment-length", type=int, default=32, help="paper: 512")
    parser.add_argument("--depth", type=int, default=8, help="paper: 14")
    parser.add_argument("--branching", type=int, default=2, help="paper: 2")
    parser.add_argument("--initial-divergence", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--compare-schedules", action="store_true",
                        help="grow the trees with every rollout driver side by side (the default first: vLLM per tree "
                        "with continued requests; then level by level, and the drivers it replaced); with --train, "
                        "time a TreePO step per tree and level by level")
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
    parser.add_argument("--train-only", action="store_true", help="compare the training steps, without the rollouts")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--tools", action="store_true", help="the agentic case: calculator problems, tool calls in "
                        "rollouts (default model: a tiny model warmed to call the tool)")
    parser.add_argument("--tool-latency", type=float, default=0.05, help="--tools: seconds each tool call takes")
    parser.add_argument("--max-tool-turns", type=int, default=3, help="--tools: max_tool_calling_iterations")
    parser.add_argument("--train-worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--packing", help="compare the packed-training paths on synthetic trees of these shapes, "
                        "comma-separated depth×segment-length (e.g. 4x256,8x512,14x512); skips the rollout benchmark")
    parser.add_argument("--layers", type=int, default=2, help="--packing: layers of the Qwen2.5-shaped model")
    parser.add_argument("--shape", choices=sorted(PACKING_SHAPES), default="0.5b",
                        help="--packing: the Qwen2.5 size whose layer shapes the model takes")
    parser.add_argument("--packing-modes", default=",".join(PACKING_MODES),
                        help="--packing: comma-separated modes among unpacked, dense, tree, and unpacked:ATTENTION "
                        "(unpacked rows with another attention implementation, e.g. unpacked:flex_attention)")
    parser.add_argument("--attention", default="sdpa", help=argparse.SUPPRESS)  # the packing worker's implementation
    parser.add_argument("--dense-limit", type=int, default=30000,
                        help="--packing: skip the dense-mask path above this many unique tokens")
    parser.add_argument("--packing-worker", choices=PACKING_MODES, help=argparse.SUPPRESS)
    return parser


def _packing_report(args) -> dict:
    """`--packing`: synthetic trees on a random model; no rollout, no warmed-up model."""
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.packing.split(",")]
    worker_argv = ["--layers", str(args.layers), "--width", str(args.width), "--seed", str(args.seed), "--shape",
                   args.shape, "--dtype", args.dtype]  # fmt: skip
    modes = tuple(mode.strip() for mode in args.packing_modes.split(","))
    points = compare_packing(worker_argv, [(length, depth) for depth, length in shapes], args.dense_limit, modes)
    report = {"packing": points, "setup": {"layers": args.layers, "width": args.width, "seed": args.seed,
                                           "device": _device_name(), "shape": args.shape, "dtype": args.dtype,
                                           **PACKING_SHAPES[args.shape]}}  # fmt: skip
    if args.plot:
        plot_packing(points, args.plot)
    return report


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def _default_model(args, argv: list[str]) -> None:
    """Without `--model`: the warmed-up tiny model (built and cached on first use), passed on to worker processes."""
    from ..testing import make_warm_model

    if args.tools:
        args.model = make_warm_model(DEFAULT_TOOL_MODEL_DIR, warm="tool-calls", steps=300)
    else:
        args.model = make_warm_model(DEFAULT_MODEL_DIR)
    argv += ["--model", args.model]


def _rollout_report(args, argv: list[str]) -> dict:
    """Sequential vs tree rollouts (and `--sweep-depths`, `--train` after them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eos_token_ids = [tokenizer.eos_token_id]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        eos_token_ids.append(tokenizer.pad_token_id)
    tools = None
    if args.tools:
        prompts, tools = tool_prompts(args, tokenizer)
    else:
        prompts = load_prompts(args, tokenizer)
    backend = Backend(args, eos_token_ids, tokenizer.pad_token_id)
    params = sampling_params(args, eos_token_ids, args.depth, args.segment_length)

    try:
        report = _compare_and_sweep(backend, prompts, params, eos_token_ids, tokenizer.decode, args, tools)
    finally:
        backend.close()
    report["setup"] = {
        "backend": args.backend,
        "model": str(args.model),
        "device": _device_name(),
        "prompts": len(prompts),
        "width": args.width,
        "segment_length": args.segment_length,
        "depth": args.depth,
        "branching": args.branching,
        "temperature": args.temperature,
        "kv_reuse": args.backend != "transformers" or not args.no_kv_reuse,
        "block_size": backend.block_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    if args.tools:
        report["setup"].update(tool_latency_s=args.tool_latency, max_tool_turns=args.max_tool_turns)

    if args.train:
        del backend  # free the rollout engine before the trainers build theirs
        report["train"] = _train_report([a for a in argv if a not in ("--train", "--json")], trainers_of(args))
    return report


def _compare_and_sweep(backend, prompts, params, eos_token_ids, decode, args, tools) -> dict:
    """The rollout comparison at the requested shape, then `--sweep-depths`."""
    report = compare(backend, prompts, params, decode, args, tools)
    print(rollout_table(report), flush=True)
    if args.sweep_depths:
        sweep = report["sweep"] = sweep_depths(backend, prompts, eos_token_ids, decode, args)
        if args.plot:
            sequential = statistics.median(p["sequential"]["leaf_tokens_per_s"] for p in sweep)
            plot_sweep(sweep, sequential, args.plot, f"{args.backend}, {_device_name()}, width {args.width}")
    return report


def _train_report(argv: list[str], trainers: tuple[str, ...]) -> dict:
    train = compare_training_steps(argv, trainers)
    level = ""
    if "treepo-level" in train:
        level = (f", TreePO level by level {train['treepo-level']['step_s']:.2f} s "
                 f"({train['level_step_speedup']:.2f}x)")  # fmt: skip
    print(f"training step: GRPO {train['grpo']['step_s']:.2f} s, "
          f"TreePO (defaults) {train['treepo']['step_s']:.2f} s ({train['step_speedup']:.2f}x){level}, "
          f"TreePO unpacked {train['treepo-unpacked']['step_s']:.2f} s", flush=True)
    print(f"loss forward+backward: TreePO unpacked {train['treepo-unpacked']['loss_s']:.2f} s, packed "
          f"{train['treepo']['loss_s']:.2f} s ({train['packed_loss_speedup']:.2f}x; packed/leaf tokens "
          f"{train['treepo']['packed_token_ratio']:.2f}); peak memory "
          f"{train['treepo-unpacked']['peak_memory_mb']:.0f} → {train['treepo']['peak_memory_mb']:.0f} MB",
          flush=True)  # fmt: skip
    print(phase_table(train), flush=True)
    return train


def phase_table(train: dict) -> str:
    """Median seconds per step of each phase, one column per trainer (`training.PHASES`)."""
    trainers = [name for name in TRAINERS if name in train]
    lines = [f"{'phase (s per step)':24}" + "".join(f"{name:>16}" for name in trainers)]
    for phase in (*PHASES, "step"):
        lines.append(f"{phase:24}" + "".join(f"{train[name]['phases'][phase]:>16.3f}" for name in trainers))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.backend == "vllm-server" and (args.train or args.train_only):
        raise SystemExit("--train times trainers on vLLM colocate or transformers: use --backend vllm or transformers.")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    if args.packing_worker:
        report = packing_worker(args)
    elif args.packing:
        report = _packing_report(args)
    else:
        if args.model is None:
            _default_model(args, argv)
        args.device_is_cpu = not torch.cuda.is_available()
        if args.train_worker:
            report = train_worker(args)
        elif args.train_only:
            report = {"train": _train_report([a for a in argv if a not in ("--train-only", "--json")],
                                             trainers_of(args))}  # fmt: skip
        else:
            report = _rollout_report(args, argv)
    if args.json or args.packing_worker or args.train_worker:  # workers hand their result back on the last line
        print(json.dumps(report))
    return report
