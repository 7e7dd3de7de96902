"""Two CPU ranks (gloo) with the policy sharded by torch's `fully_shard` (FSDP2), on deliberately uneven trees.

Under sharding every forward is a collective, so a rank that runs fewer forwards than the other leaves it waiting
forever. Rank 0's paths stop at their first token (its EOS is the token the model writes first), so its trees are a
level shorter than rank 1's and it prefills at a level where rank 1 reuses its cache; rank 1's longer leaves pack
into more sequences under a small token budget. Launched by tests/test_lockstep.py under torchrun, with a timeout:

    torchrun --nproc_per_node 2 tests/sharded_job.py MODEL OUT

Each rank writes what it computed; the test recomputes it in one unsharded process and compares.
"""

import json
import sys
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

WIDTH, SEGMENT, DEPTH, BUDGET = 4, 3, 3, 24


def prompts_of(rank: int) -> list[list[int]]:
    """Rank 0 asks one prompt twice (its paths stop at their first token); rank 1 asks two others."""
    return [[10, 11, 12, 13]] * 2 if rank == 0 else [[11, 11, 12, 13], [21, 21, 22]]


def rows_of(prompts, leaves, pad: int):
    """TRL's layout of the leaves: left-padded prompts, then right-padded completions."""
    pairs = [(prompts[leaf.prompt_index], leaf.token_ids) for leaf in leaves]
    prompt_width, width = max(len(p) for p, _ in pairs), max(len(c) for _, c in pairs)
    ids = torch.full((len(pairs), prompt_width + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(pairs):
        ids[row, prompt_width - len(prompt) : prompt_width + len(completion)] = torch.tensor(prompt + completion)
        mask[row, prompt_width - len(prompt) : prompt_width + len(completion)] = 1
    return ids, mask, width


def unpacked_logps(model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
    """Per-token log-probabilities of the completions, one row each (what TRL's unpacked forward computes)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    return logps, None, None


def first_token(model, prompt) -> int:
    with torch.no_grad():
        return int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())


def grow(model, prompts, eos: int, agree=None):
    from transformers import GenerationConfig

    from trl_treepo.backends.transformers import TransformersSegmentEngine
    from trl_treepo.sampling import TreeSamplingParams
    from trl_treepo.tree import grow_trees

    config = GenerationConfig(do_sample=False, eos_token_id=[eos], pad_token_id=0)
    params = TreeSamplingParams(width=WIDTH, segment_length=SEGMENT, max_depth=DEPTH, eos_token_ids=(eos,),
                                fallback_policy="restart", answer_stop="none", repetition_window=0)  # fmt: skip
    engine = TransformersSegmentEngine(model, config, 0, agree=agree)
    with torch.no_grad():
        rollout = grow_trees(engine, prompts, params)
    engine.finish()
    return rollout


def packed_forward(model, accelerator, ids, mask, width):
    from trl_treepo.trainer.packed_forward import PackedForward

    trainer = SimpleNamespace(
        args=SimpleNamespace(tree_packed_training=True, tree_packed_max_tokens=BUDGET),
        accelerator=accelerator,
        _metrics={"train": defaultdict(list)},
    )
    packing = PackedForward(trainer)
    logps, _, _ = packing.logps_and_entropies(model, ids, mask, width, None, False, False, {}, unpacked_logps)
    return packing, logps


def main(model_dir: str, output: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from trl_treepo.trainer.lockstep import Lockstep

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    add_fused_lm_head(model)  # as GRPOTrainer sets the policy up
    prompts = prompts_of(rank)
    eos = first_token(model, prompts_of(0)[0])  # rank 0's paths stop at once; rank 1's run the full depth
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    accelerator = SimpleNamespace(num_processes=dist.get_world_size(), device=torch.device("cpu"),
                                  unwrap_model=lambda m: m, autocast=nullcontext, mixed_precision="no")  # fmt: skip
    lockstep = Lockstep(accelerator)
    rollout = grow(model, prompts, eos, agree=lockstep.agree_max)
    leaves = rollout.flat_leaves()
    ids, mask, width = rows_of(prompts, leaves, pad=0)
    model.train()
    packing, logps = packed_forward(model, accelerator, ids, mask, width)
    logps.sum().backward()  # every rank runs the backward of as many forwards (stand-ins joined with weight 0)
    gradient = sum(p.grad.full_tensor().abs().sum().item() for p in model.parameters() if p.grad is not None)
    result = dict(
        eos=eos,
        levels=rollout.stats.engine_calls,
        leaves=[(leaf.prompt_index, leaf.token_ids) for leaf in leaves],
        logps=logps.detach().tolist(),
        verified=packing.verified,
        gradient=gradient,
    )
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
