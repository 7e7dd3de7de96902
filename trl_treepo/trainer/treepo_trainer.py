"""`TreePOTrainer`: GRPOTrainer with TreePO's segment-tree rollouts and tree-based advantages.

Wiring only: each GRPOTrainer method below is extended through `super()` and delegates to the room that owns the
concern.

- `_generate_single_turn`: grow one tree per prompt, whose leaves are the prompt's `num_generations` rows
  (`rollouts.py`, paper §2);
- `_tool_call_loop`: hand TRL the conversations of leaves whose tools ran inside the tree, once per node
  (`rollouts.py`);
- `_calculate_rewards`: keep the gathered rewards, padding rows as NaN (`advantage_step.py`);
- `_generate_and_score_completions`: tree advantages (paper Eq. 5–7), dynamic sampling and the rows that train
  (`advantage_step.py`, paper §3), then `tree/*` metrics and tree pictures (`telemetry.py`);
- `_prepare_inputs`: micro-batches of whole trees with `tree_packed_training` (`packed_forward.py`);
- `_get_per_token_logps_and_entropies`: one forward per prompt's token trie, exact, or TRL's own (`packed_forward.py`);
- `create_model_card`: the TreePO configuration in TRL's card (`telemetry.py`).

Padding, rewards, old/ref log-probs, vLLM importance sampling, the loss and logging stay TRL's own.
"""

from __future__ import annotations

import logging
import os
import textwrap

import torch
import trl
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from ..config import TreePOConfig, grpo_differences_message
from .advantage_step import AdvantageStep, name_failures
from .compatibility import check_grpo_trainer
from .packed_forward import PackedForward, shuffling_whole_trees
from .rollouts import TreeRollouts, refuse_unsupported_rollouts, unreachable_server_error
from .telemetry import TreeTelemetry, add_treepo_section

logger = logging.getLogger(__name__)

check_grpo_trainer(GRPOTrainer, trl.__version__)  # before any override can be silently skipped or misfed


class TreePOTrainer(GRPOTrainer):
    """Trainer for TreePO ([arXiv 2508.17445](https://huggingface.co/papers/2508.17445)).

    A drop-in for [`~trl.GRPOTrainer`]: same arguments, same datasets and reward functions, with a [`TreePOConfig`].
    During training each prompt grows a tree of fixed-length segments (`tree_segment_length`) whose `num_generations`
    leaves are the completions, and advantages come from the tree's nested subgroups (paper Eq. 5). Generation runs
    on the transformers backend, or through TRL's vLLM integration with `use_vllm=True`. Evaluation samples
    sequentially, as in the paper.

    Example:

    ```python
    from trl_treepo import TreePOConfig, TreePOTrainer

    trainer = TreePOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=accuracy_reward,
        args=TreePOConfig(num_generations=8, tree_segment_length=256, tree_max_depth=4),
        train_dataset=dataset,
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "treepo"]
    _name = "TreePO"
    _paper = {
        "title": "TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference Efficiency with "
        "Heuristic Tree-based Modeling",
        "id": "2508.17445",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{li2025treepo,
                title        = {{TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference Efficiency with Heuristic Tree-based Modeling}},
                author       = {Yizhi Li and Qingshui Gu and Zhoufutu Wen and Ziniu Li and Tianshun Xing and Shuyue Guo and Tianyu Zheng and Xin Zhou and Xingwei Qu and Wangchunshu Zhou and Zheng Zhang and Wei Shen and Qian Liu and Chenghua Lin and Jian Yang and Ge Zhang and Wenhao Huang},
                year         = 2025,
                eprint       = {arXiv:2508.17445},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: TreePOConfig | None = None, *pargs, **kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = TreePOConfig(f"{model_name.split('/')[-1]}-TreePO")
        if not isinstance(args, TreePOConfig):
            raise TypeError(
                f"TreePOTrainer needs a TreePOConfig, got {type(args).__name__}. Build one with the same arguments: "
                "TreePOConfig(**your_grpo_args)."
            )
        refuse_unsupported_rollouts(args, kwargs)
        try:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        except OSError as error:
            unreachable = unreachable_server_error(error, args, model)
            if unreachable is None:
                raise
            raise unreachable from error
        if args.tree_sampling and self.rollout_func is not None:
            raise ValueError(
                "A rollout_func replaces TRL's generation, so no tree would be grown and GRPO's advantages would train "
                "under the TreePO name. Remove rollout_func, or set tree_sampling=False to train exactly as "
                "GRPOTrainer does with it."
            )
        if self.accelerator.is_main_process:
            logger.warning(grpo_differences_message(args))
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else name_failures(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        self._rollouts = TreeRollouts(self)
        self._advantage_step = AdvantageStep(self)
        self._packed_forward = PackedForward(self)
        self._telemetry = TreeTelemetry(self)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (tags `trl` and `treepo`, the TreePO citation), plus the run's TreePO configuration."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.exists(path):
            add_treepo_section(path, self.args, self.hub_model_id or self.args.output_dir)

    # --------------------------------------------------------------------------------------------------- rollout

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self._rollouts.grows_tree(num_generations):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return self._rollouts.generate(prompt_ids, images, multimodal_fields, num_generations)

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        """Tree leaves ran their tools inside the tree, once per node: hand TRL their conversations, tool masks and
        tool counts, in the shape `GRPOTrainer._tool_call_loop` returns. Sequential generation (evaluation,
        tree_sampling=False) keeps TRL's loop."""
        if self._rollouts.batch is None:
            return super()._tool_call_loop(
                prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields
            )
        return self._rollouts.tool_call_loop_result(prompt_ids, completion_ids, logprobs)

    # ------------------------------------------------------------------------------------------------ advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        batch = self._rollouts.batch
        return self._advantage_step.keep_rewards(rewards_per_func, None if batch is None else batch.padded)

    def _generate_and_score_completions(self, inputs):
        if not (self.args.tree_sampling and self.model.training):
            return super()._generate_and_score_completions(inputs)  # GRPOTrainer's step, unchanged
        self._rollouts.begin(inputs)
        # A leaf that the tree stopped on purpose (answer, repetition, stop string) ends without EOS, and TRL would
        # take it for truncated. TRL's masking is off for this call; the advantage step masks the leaves the length
        # limit cut, from their finish reasons.
        mask_truncated, self.mask_truncated_completions = self.mask_truncated_completions, False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.mask_truncated_completions = mask_truncated
        batch = self._rollouts.take_batch()
        paths = [path for process_paths in gather_object([batch.paths]) for path in process_paths]
        truncated = self.accelerator.gather(torch.tensor(batch.truncated, device=self.accelerator.device))
        self._advantage_step.log_truncation(output, truncated)
        with profiling_context(self, "tree.advantages"):
            self._advantage_step.replace_advantages(output, batch, paths, truncated if mask_truncated else None)
        self._telemetry.log_tree_metrics(batch, paths)
        if self._telemetry.draws_tree_this_step():
            self._telemetry.write_tree_picture(batch, output, self._advantage_step.summed_rewards())
        return output

    # ------------------------------------------------------------------------------------------ packed training

    def _prepare_inputs(self, generation_batch):
        if not (self.args.tree_packed_training and self.model.training):
            return super()._prepare_inputs(generation_batch)
        # TRL shuffles the generation batch row by row before cutting it into micro-batches, so a micro-batch would
        # hold scattered leaves of many trees; shuffled tree by tree, each gradient pass packs whole tries.
        with shuffling_whole_trees():
            return super()._prepare_inputs(generation_batch)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal_inputs,
    ):  # fmt: skip
        """With `tree_packed_training`, one forward over each prompt's token trie instead of one per row (exact).

        Everything else, and whatever packing cannot compute exactly, goes to TRL's own method.
        """
        unpacked = super()._get_per_token_logps_and_entropies
        packed = self._packed_forward.logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
            multimodal_inputs, unpacked,
        )  # fmt: skip
        if packed is not None:
            return packed
        # Keywords past the first four: TRL 1.14's method takes them so (it forwards `*args` to `_full_logits_logps`).
        return unpacked(
            model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss, **multimodal_inputs,
        )  # fmt: skip
