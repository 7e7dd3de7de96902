"""TreePO steps under any `accelerate launch` configuration, two CPU processes; launched by test_deepspeed.py.

    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3_cpu.yaml \\
        tests/deepspeed_job.py MODEL OUT [packed] [uneven]

`packed`: with `tree_packed_training`. `uneven`: rank 0's policy writes EOS at once while generating, so its trees
are shorter, fall back and prefill where rank 1's do not, and pack into fewer sequences. Each rank writes its losses,
its forward and `generate` counts per step (ZeRO-3 makes every forward a collective: they must be equal), how
DeepSpeed holds the weights, and the full updated weights (gathered, under ZeRO-3) for the test to compare with the
same job run unsharded.

The script's own directory (tests/) is on `sys.path`, so it shares the test helpers.
"""

import contextlib
import json
import sys

import torch
from accelerate import PartialState
from multiprocess_job import count_policy_calls
from test_trainer import reward_length, tiny_args

from trl_treepo import TreePOTrainer
from trl_treepo.testing import make_math_dataset


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's full value on this rank, gathering ZeRO-3's partitions first."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    parameters = list(model.parameters())
    gathered = contextlib.nullcontext()
    if hasattr(parameters[0], "ds_id"):  # partitioned by ZeRO-3
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters)
    with gathered:
        return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def main(model: str, output_dir: str, packed: bool, uneven: bool) -> None:
    # Plain SGD: Adam's first steps divide each gradient by its own magnitude, which would turn the float noise of
    # sharded reductions in near-zero gradients into visible weight differences.
    args = tiny_args(output_dir, tree_packed_training=packed, tree_packed_max_tokens=40 if packed else None,
                     tree_fallback_policy="restart", tree_segment_length=4, optim="sgd", learning_rate=1.0)  # fmt: skip
    trainer = TreePOTrainer(model=model, reward_funcs=reward_length, args=args, train_dataset=make_math_dataset(size=32))
    steps = count_policy_calls(trainer, uneven)
    trainer.train()
    state, policy = PartialState(), trainer.accelerator.unwrap_model(trainer.model)
    plugin = trainer.accelerator.state.deepspeed_plugin
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    torch.save(full_weights(trainer), f"{output_dir}/weights{state.process_index}.pt")
    with open(f"{output_dir}/rank{state.process_index}.json", "w") as handle:
        json.dump(dict(world_size=state.num_processes, distributed_type=str(trainer.accelerator.distributed_type),
                       zero_stage=plugin.zero_stage if plugin else None, steps=steps, logs=logs,
                       partitioned=hasattr(next(policy.parameters()), "ds_id"),
                       packing=trainer._packed_forward.verified), handle)  # fmt: skip
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "packed" in sys.argv[3:], "uneven" in sys.argv[3:])
