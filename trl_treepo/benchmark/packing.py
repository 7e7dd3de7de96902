"""Packed training (`--packing`): one micro-batch (one tree) of loss forward + backward, as TRL's unpacked rows, as a
dense-mask packed sequence, and with tree attention (`trl_treepo.packing`), on synthetic trees grown by the real
sampler. Each shape and mode runs in its own process, since peak memory is per process."""

from __future__ import annotations

import os
import resource
import time

from ..sampling import TreeSamplingParams
from ..tree import grow_trees
from .harness import run_worker, worker_result


# Qwen2.5's layer shapes (hidden size, query heads, KV heads, MLP), used with few layers and the 8k offline vocabulary:
# the per-token work of a real model. 0.5B is small enough for two CPU cores; 1.5B and 7B are for a GPU.
PACKING_SHAPES = {
    "0.5b": dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960),
    "7b": dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
}
PACKING_MODEL = PACKING_SHAPES["0.5b"]
PACKING_MODES = ("unpacked", "dense", "tree")


def synthetic_tree_rows(num_prompts: int, width: int, segment_length: int, depth: int, seed: int, vocab: int = 8000):
    """Rows (prompt, completion) of `num_prompts` trees grown by the real sampler on random tokens.

    Early stops follow a policy that answers after a few segments: each segment ends with EOS (at a uniform point)
    with probability 0.06 per segment of depth, up to 0.6, so most leaves stop between a third and two thirds of the
    depth, some at the first segments (fallbacks) and some at the length limit. Prompts are 100–300 tokens.
    """
    import random

    from ..testing import ScriptedEngine

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


def _one_tree_as_rows(args, device):
    """One tree of `--width` leaves in TRL's layout (left-padded prompt, right-padded completions): ids, mask, and the
    prompt and completion widths. Gradient accumulation 4 over 4 trees: a micro-batch holds one whole tree."""
    import torch

    rows = synthetic_tree_rows(4, args.width, args.segment_length, args.depth, args.seed)[: args.width]
    prompt_width = max(len(p) for p, _ in rows)
    width = max(len(c) for _, c in rows)
    ids = torch.zeros(len(rows), prompt_width + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(rows):
        ids[row, prompt_width - len(prompt) : prompt_width + len(completion)] = torch.tensor(prompt + completion)
        mask[row, prompt_width - len(prompt) : prompt_width + len(completion)] = 1
    return ids.to(device), mask.to(device), prompt_width, width


def packing_worker(args) -> dict:
    """Loss forward + backward of one micro-batch (one tree of `--width` leaves) in one mode, in its own process.

    Mode `unpacked` runs TRL's rows with `--attention` (the model's attention implementation), `dense` the packed
    sequence with an L × L mask, `tree` the packed sequence with tree attention; `tree` also reports the largest
    |packed − unpacked| log-prob. On a GPU, one untimed step first loads the kernels, and peak memory is CUDA's.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ..packing import install_tree_attention, pack_rows

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    config = Qwen2Config(vocab_size=8214, num_hidden_layers=args.layers, max_position_embeddings=32768,
                         tie_word_embeddings=False, **PACKING_SHAPES[args.shape])  # fmt: skip
    config._attn_implementation = args.attention
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).train()
    add_fused_lm_head(model)
    install_tree_attention()
    ids, mask, prompt_width, width = _one_tree_as_rows(args, device)
    advantages = torch.randn(len(ids), 1, device=device)
    completion_mask = mask[:, prompt_width:].float()

    def loss_of(logps):  # DAPO-style token mean of -A * logp, as TRL's loss on the first pass
        return -(logps.float() * advantages * completion_mask).sum() / completion_mask.sum()

    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt_width] = -100

    def unpacked():
        return model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, -width:]

    packed = pack_rows(ids, mask, width)
    step = unpacked
    if args.packing_worker != "unpacked":
        sequence = packed.sequences[0]
        tree = args.packing_worker == "tree"
        attention = sequence.attention_mask if tree else sequence.tree.dense_mask().to(device)
        extra = {"tree_attention": sequence.tree} if tree else {}

        def step():
            output = model(input_ids=sequence.input_ids, attention_mask=attention, position_ids=sequence.position_ids,
                           shift_labels=sequence.shift_labels, fused_lm_head=True, **extra)  # fmt: skip
            return packed.unpack([output.log_probs])

    if device.type == "cuda":
        loss_of(step()).backward()  # kernels load on first use
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _current_rss_mb()
    started = time.perf_counter()
    logps = step()
    loss_of(logps).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    )  # fmt: skip
    result = {
        "mode": args.packing_worker,
        "loss_s": seconds,
        "peak_mb": peak,
        "row_tokens": packed.row_tokens,
        "padded_tokens": ids.numel(),  # what the unpacked forward computes: every row padded to the longest
        "unique_tokens": packed.packed_tokens,
        "leaf_tokens": int(completion_mask.sum()),
    }
    if args.packing_worker == "tree":
        with torch.no_grad():
            reference = unpacked()
        valid = completion_mask.bool()
        result["max_logprob_gap"] = (logps.detach().float() - reference.float())[valid].abs().max().item()
    return result


def compare_packing(argv: list[str], shapes: list[tuple[int, int]], dense_limit: int,
                    modes: tuple[str, ...] = PACKING_MODES) -> list[dict]:  # fmt: skip
    """Each shape (segment length, depth) in every mode, each in a fresh process (peak memory is per process).

    A mode `unpacked:IMPLEMENTATION` runs the unpacked rows with another attention implementation (e.g.
    `unpacked:flex_attention`), reported as `unpacked_IMPLEMENTATION`.
    """
    results = []
    for segment_length, depth in shapes:
        point = {"segment_length": segment_length, "depth": depth}
        for mode in modes:
            worker, _, attention = mode.partition(":")
            key = f"{worker}_{attention}" if attention else mode
            if mode == "dense" and point.get("unique_tokens", 0) > dense_limit:
                point[mode] = None  # an L × L mask would not fit: skipped, as the dense path cannot run there
                continue
            extra = ["--attention", attention] if attention else []
            finished = run_worker([*argv, *extra, "--segment-length", str(segment_length), "--depth", str(depth),
                                   "--packing-worker", worker])  # fmt: skip
            if finished.returncode != 0:  # killed for memory (the dense mask, or unpacked rows at the largest shapes)
                print(f"{mode} did not run at {depth} × {segment_length} (exit {finished.returncode}): "
                      f"{finished.stderr.strip()[-300:]}", flush=True)  # fmt: skip
                point[key] = None
                continue
            result = worker_result(finished)
            point.update({name: result[name] for name in ("row_tokens", "padded_tokens", "unique_tokens")})
            point[key] = {"loss_s": result["loss_s"], "peak_mb": result["peak_mb"]}
            if "max_logprob_gap" in result:
                point["max_logprob_gap"] = result["max_logprob_gap"]
        if "row_tokens" not in point:  # no mode ran at this shape
            results.append(point)
            continue
        point["packed_token_ratio"] = point["unique_tokens"] / point["row_tokens"]
        point["ideal_speedup"] = 1 / point["packed_token_ratio"]
        for mode in ("dense", "tree"):
            if point.get(mode) is not None and point.get("unpacked") is not None:
                point[f"{mode}_speedup"] = point["unpacked"]["loss_s"] / point[mode]["loss_s"]
        keys = [m.replace(":", "_") for m in modes]
        print(f"{depth:2d} × {segment_length:3d}: {point['row_tokens']:6d} row tokens, {point['unique_tokens']:6d} "
              f"unique (ratio {point['packed_token_ratio']:.2f}, ideal {point['ideal_speedup']:.2f}x) | "
              + " | ".join(f"{m} {point[m]['loss_s']:.1f} s {point[m]['peak_mb']:.0f} MB" if point.get(m) else f"{m} -"
                           for m in keys), flush=True)  # fmt: skip
        results.append(point)
    return results


def plot_packing(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"unpacked": ("unpacked rows", "o"), "dense": ("dense-mask packing", "s"), "tree": ("tree attention", "^")}
    for mode, (label, marker) in styles.items():
        measured = sorted((p["unique_tokens"], p[mode]) for p in points if p.get(mode) is not None)
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


