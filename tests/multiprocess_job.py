"""A short TreePO run that dumps what each process saw; launched by test_multiprocess.py under `accelerate launch`.

    accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml tests/multiprocess_job.py MODEL OUT
    accelerate launch ... tests/multiprocess_job.py MODEL OUT uneven

`uneven`: rank 0's policy is made to write EOS at once during generation, so its trees are shorter, fall back and
prefill where rank 1's do not, and pack into fewer sequences; each rank counts its policy forwards and `generate`
calls per step, which sharded training (FSDP, ZeRO-3) needs equal on every rank.

The script's own directory (tests/) is on `sys.path`, so it shares the test helpers.
"""

import json
import sys

import torch
from accelerate import PartialState
from test_trainer import record_batches, reward_length, tiny_args

from trl_treepo import TreePOTrainer
from trl_treepo.testing import make_math_dataset


def main(model: str, output_dir: str) -> None:
    trainer = TreePOTrainer(
        model=model, reward_funcs=reward_length, args=tiny_args(output_dir), train_dataset=make_math_dataset(size=32)
    )
    batches = record_batches(trainer)
    trainer.train()
    steps = [
        dict(
            paths=[repr(path) for path in batch["paths"]],
            local_paths=[repr(path) for path in batch["local_paths"]],
            rewards=batch["rewards_per_func"][:, 0].tolist(),
            prompt_ids=batch["prompt_ids"].tolist(),
            prompt_mask=batch["prompt_mask"].tolist(),
            token_counts=batch["mask"].sum(dim=1).tolist(),
            advantages=batch["advantages"].tolist(),
        )
        for batch in batches
    ]
    state = PartialState()
    checksum = sum(p.detach().double().sum().item() for p in trainer.model.parameters())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(f"{output_dir}/rank{state.process_index}.json", "w") as handle:
        json.dump(dict(world_size=state.num_processes, steps=steps, checksum=checksum, logs=logs), handle)
    torch.distributed.barrier()


def count_policy_calls(trainer, uneven: bool) -> list:
    """Count the policy's forwards and `generate` calls, per step and per rank (every rank's counts, gathered at each
    step's end, go to the list returned). With `uneven`, rank 0's policy writes EOS at once while generating."""
    from transformers import TrainerCallback

    state = PartialState()
    policy = trainer.accelerator.unwrap_model(trainer.model)
    eos = trainer.processing_class.eos_token_id
    counts, steps, generating = {"forward": 0, "generate": 0}, [], [False]
    policy.register_forward_pre_hook(lambda module, args: counts.__setitem__("forward", counts["forward"] + 1))
    generate = policy.generate

    def counted_generate(*args, **kwargs):
        counts["generate"] += 1
        generating[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            generating[0] = False

    policy.generate = counted_generate

    def eos_at_once(module, inputs, output):  # rank 0 only: its paths stop at their first token
        if generating[0]:
            output = output.clone()
            output[..., eos] = 1e4
        return output

    if uneven and state.process_index == 0:
        policy.lm_head.register_forward_hook(eos_at_once)

    class Counts(TrainerCallback):
        def on_step_end(self, *a, **k):
            every = [None] * state.num_processes
            torch.distributed.all_gather_object(every, dict(counts))
            steps.append(every)
            counts.update(forward=0, generate=0)

    trainer.add_callback(Counts())
    return steps


def uneven(model: str, output_dir: str) -> None:
    args = tiny_args(output_dir, tree_packed_training=True, tree_packed_max_tokens=40, tree_fallback_policy="restart",
                     tree_max_depth=3, tree_segment_length=4)  # fmt: skip
    trainer = TreePOTrainer(model=model, reward_funcs=reward_length, args=args, train_dataset=make_math_dataset(size=32))
    steps = count_policy_calls(trainer, uneven=True)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(f"{output_dir}/rank{PartialState().process_index}.json", "w") as handle:
        json.dump(dict(steps=steps, logs=logs, packing=trainer._packed_forward.verified), handle)
    torch.distributed.barrier()


if __name__ == "__main__":
    (uneven if sys.argv[3:] == ["uneven"] else main)(sys.argv[1], sys.argv[2])
