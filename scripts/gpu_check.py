"""The GPU check: the packed training and the tree rollout measured on one GPU, in a few minutes, in one JSON object.

Every figure of docs/benchmarks.md was measured on a 2-core CPU; this script measures, on a GPU (one H200 when the
project is lent one), the code paths users train with there:

1. `packing`: one micro-batch (a tree of 16 leaves, segments of 512 tokens, depth 4 to 14) of a random-init model
   with Qwen2.5-1.5B's layer shapes in bfloat16: TRL's unpacked rows (SDPA, and FlexAttention) against tree
   attention; loss forward + backward time, peak CUDA memory, and the largest packed-vs-unpacked log-prob gap;
2. `training_step`: a TreePOTrainer step (packed and not) against a GRPOTrainer step with the same leaves, on the
   transformers backend, in bfloat16;
3. `rollout`: the transformers-backend rollout, a tree with KV reuse against GRPO's sequential samples.

Each part runs `python -m trl_treepo.benchmark` in its own processes under a hard time limit; the JSON file is
rewritten after every finished piece, so what ran before a limit is kept. `--dry-run` runs the same script at tiny
shapes on a CPU (tests/test_gpu_check.py, in `make test`), so that it cannot rot while no GPU is lent.

    scripts/gpu_check.sh                      # on the GPU machine: installs the carried wheels, then this script
    python scripts/gpu_check.py --dry-run --output outputs/gpu-check/dry-run.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each part runs, at full size (GPU) and at tiny size (the CPU dry run), with its time limit in seconds.
FULL = {
    "packing": dict(limit=210, shapes=["4x512", "8x512", "14x512"],
                    flags=["--width", "16", "--layers", "4", "--shape", "1.5b", "--dtype", "bfloat16",
                           "--packing-modes", "unpacked,unpacked:flex_attention,tree"]),
    "model": dict(vocab_size=8192, hidden_size=1536, num_layers=4, num_attention_heads=12, num_key_value_heads=2),
    "training_step": dict(limit=150, flags=["--prompts", "2", "--width", "16", "--segment-length", "256", "--depth",
                                            "4", "--warmup", "1", "--repeats", "1"]),
    "rollout": dict(limit=90, flags=["--prompts", "8", "--width", "16", "--segment-length", "256", "--depth", "4",
                                     "--warmup", "1", "--repeats", "2", "--dtype", "bfloat16"]),
}  # fmt: skip
DRY_RUN = {
    "packing": dict(limit=300, shapes=["2x16"], flags=["--width", "4", "--layers", "1", "--shape", "0.5b",
                                                       "--packing-modes", "unpacked,tree"]),
    "model": dict(vocab_size=512, hidden_size=64, num_layers=2),
    "training_step": dict(limit=600, flags=["--prompts", "2", "--width", "4", "--segment-length", "4", "--depth", "3",
                                            "--warmup", "0", "--repeats", "1"]),
    "rollout": dict(limit=300, flags=["--prompts", "2", "--width", "4", "--segment-length", "4", "--depth", "3",
                                      "--warmup", "0", "--repeats", "1"]),
}  # fmt: skip


def benchmark(argv: list[str], limit: float) -> dict:
    """`python -m trl_treepo.benchmark ARGV --json` within `limit` seconds: its JSON, or why there is none."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "trl_treepo.benchmark", *argv, "--json"], cwd=ROOT,
                              capture_output=True, text=True, timeout=limit)  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")[-1500:]
        return {"status": f"stopped at its {limit:.0f} s limit", "output_tail": tail.decode() if isinstance(tail, bytes)
                else tail}  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"status": f"failed (exit {done.returncode})", "error_tail": done.stderr[-3000:], "seconds": seconds}
    return {"status": "ok", "seconds": seconds, "result": json.loads(done.stdout.strip().splitlines()[-1])}


def run(plan: dict, output: Path, budget: float) -> dict:
    import torch

    from trl_treepo.testing import make_tiny_model

    started = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "plan": plan,
        "parts": {},
    }

    def save():
        report["seconds"] = time.perf_counter() - started
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1))

    def limit(part: str) -> float:  # a part's own limit, and never past the whole budget
        return max(1.0, min(plan[part]["limit"], budget - (time.perf_counter() - started)))

    packing = report["parts"]["packing"] = {}
    for shape in plan["packing"]["shapes"]:  # one shape at a time, so that finished shapes are kept
        packing[shape] = benchmark(["--packing", shape, *plan["packing"]["flags"]], limit("packing"))
        save()
    model = make_tiny_model(output.parent / "gpu-check-model", **plan["model"])
    common = ["--model", model, "--task", "synthetic", "--backend", "transformers"]
    report["parts"]["training_step"] = benchmark([*common, "--train-only", *plan["training_step"]["flags"]],
                                                 limit("training_step"))  # fmt: skip
    save()
    report["parts"]["rollout"] = benchmark([*common, *plan["rollout"]["flags"]], limit("rollout"))
    save()
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "outputs/gpu-check/gpu_check.json"))
    parser.add_argument("--budget", type=float, default=480, help="seconds for all parts together")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on a CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(DRY_RUN if args.dry_run else FULL, Path(args.output), args.budget)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
