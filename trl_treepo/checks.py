"""Prefix-cache correctness check: do tree leaves sampled by an engine score the same under the training model?

Tree rollouts lean on the engine's prefix cache: every deeper segment and every sibling is decoded on top of a
cached prefix. A cache that served a wrong prefix (users have reported garbled outputs with prefix caching on,
verl#2387) would not crash; it would silently train on off-policy text. This check recomputes each leaf's token
logprobs with the training model, from scratch and without any cache, and compares them with the sampling logprobs
the engine returned, per tree depth. During training, TRL's `sampling/sampling_logp_difference/{mean,max}` metrics
report the same gap for every batch when `use_vllm=True`.

Command line (vLLM with prefix caching on, against the same weights in transformers):

    python -m trl_treepo.checks --model PATH [--segment-length 32 --depth 4 --width 8 --prompts 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from .tree import TreeRollout


@torch.no_grad()
def leaf_logprob_gap(model, prompts: Sequence[Sequence[int]], rollout: TreeRollout, segment_length: int,
                     temperature: float = 1.0) -> dict:
    """Compare the engine's sampling logprobs of every leaf with `model`'s, recomputed without any cache.

    Sampling must have used plain temperature sampling (no top-k/top-p/min-p), so that both sides score the same
    distribution. Returns the mean and max absolute gap over all leaf tokens, the max per segment depth, and the
    number of tokens compared.
    """
    device = next(model.parameters()).device
    gaps, depth_max = [], {}
    for prompt_index, leaves in enumerate(rollout.leaves):
        prompt = list(prompts[prompt_index])
        for leaf in leaves:
            if leaf.logprobs is None:
                raise ValueError("The rollout carries no sampling logprobs; sample with an engine that returns them.")
            ids = torch.tensor([prompt + leaf.token_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            recomputed = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt) :, None]).squeeze(1)
            gap = (recomputed.cpu() - torch.tensor(leaf.logprobs, dtype=torch.float32)).abs()
            gaps.append(gap)
            for depth, (start, end) in enumerate(leaf.segment_bounds(segment_length)):
                segment = gap[start:end]
                if segment.numel():
                    depth_max[depth + 1] = max(depth_max.get(depth + 1, 0.0), segment.max().item())
    every = torch.cat(gaps)
    return {
        "mean_abs_gap": every.mean().item(),
        "max_abs_gap": every.max().item(),
        "max_abs_gap_by_depth": dict(sorted(depth_max.items())),
        "tokens": every.numel(),
    }


def _prometheus_counters(base_url: str) -> dict[str, float]:
    import urllib.request

    counters: dict[str, float] = {}
    for line in urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode().splitlines():
        for name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"):
            if line.startswith(name + "_total"):
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def _engine_counters(llm) -> dict[str, float]:
    return {m.name: float(m.value) for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model directory (the weights the engine serves)")
    parser.add_argument("--server", help="base URL of a running `vllm serve`; default: an in-process vllm.LLM")
    parser.add_argument("--segment-length", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--block-size", type=int, help="in-process engine: KV block size (vLLM-CPU default: 128)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest acceptable absolute logprob gap")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.3, help="vLLM memory fraction (of host RAM on vLLM-CPU)"
    )
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .backends.vllm import VLLMColocateEngine, VLLMServerEngine
    from .sampling import TreeSamplingParams
    from .testing import make_math_dataset
    from .tree import grow_trees

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in make_math_dataset(size=args.prompts)
    ]
    eos = [tokenizer.eos_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else [])
    params = TreeSamplingParams(width=args.width, segment_length=args.segment_length, max_depth=args.depth,
                                eos_token_ids=tuple(eos))
    if args.server:
        from trl.generation.vllm_client import VLLMClient

        engine = VLLMServerEngine(VLLMClient(base_url=args.server, connection_timeout=30), {"temperature": 1.0})
        read_counters = lambda: _prometheus_counters(args.server)  # noqa: E731
    else:
        from vllm import LLM

        llm = LLM(model=args.model, dtype="float32", enable_prefix_caching=True, max_model_len=4096,
                  gpu_memory_utilization=args.gpu_memory_utilization, logprobs_mode="processed_logprobs",
                  enforce_eager=True, disable_log_stats=False, block_size=args.block_size)
        engine = VLLMColocateEngine(llm, {"temperature": 1.0})
        read_counters = lambda: _engine_counters(llm)  # noqa: E731
    before = read_counters()
    rollout = grow_trees(engine, prompts, params, tokenizer.decode)
    after = read_counters()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    report = leaf_logprob_gap(model, prompts, rollout, args.segment_length)
    queries = after.get("vllm:prefix_cache_queries", 0.0) - before.get("vllm:prefix_cache_queries", 0.0)
    hits = after.get("vllm:prefix_cache_hits", 0.0) - before.get("vllm:prefix_cache_hits", 0.0)
    report["prefix_cache_hit_rate"] = hits / queries if queries else None
    report["decoded_tokens"] = rollout.stats.decoded_tokens
    report["leaf_tokens"] = rollout.stats.leaf_tokens
    print(json.dumps(report))
    return 0 if report["max_abs_gap"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
