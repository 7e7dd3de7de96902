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


def packing_worker(args) -> dict:
    """Loss forward + backward of one micro-batch (one tree of `--width` leaves) in one mode, in its own process."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ..packing import install_tree_attention, pack_rows

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
    results = []
    for segment_length, depth in shapes:
        point = {"segment_length": segment_length, "depth": depth}
        for mode in PACKING_MODES:
            if mode == "dense" and point.get("unique_tokens", 0) > dense_limit:
                point[mode] = None  # an L × L mask would not fit: skipped, as the dense path cannot run there
                continue
            finished = run_worker([*argv, "--segment-length", str(segment_length), "--depth", str(depth),
                                   "--packing-worker", mode])  # fmt: skip
            if finished.returncode != 0:  # killed for memory (the dense mask, or unpacked rows at the largest shapes)
                print(f"{mode} did not run at {depth} × {segment_length} (exit {finished.returncode}): "
                      f"{finished.stderr.strip()[-300:]}", flush=True)  # fmt: skip
                point[mode] = None
                continue
            result = worker_result(finished)
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


def plot_packing(points: list[dict], path: str) -> None:
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


