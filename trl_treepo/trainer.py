"""`TreePOTrainer`: GRPOTrainer with TreePO's segment-tree rollouts and tree-based advantages.

Wiring only. These GRPOTrainer methods are extended, each through `super()`:

- `_generate_single_turn` grows one tree per prompt instead of `num_generations` independent samples, and returns
  the root→leaf paths as the completions (row ``i * G + j`` is leaf j of prompt i). With `tools` or an
  `environment_factory`, the trees grow through tool calls (`tools.py`);
- `_tool_call_loop` hands TRL the conversations, tool mask and tool counts of those multi-turn leaves, whose tools
  already ran inside the tree (once per node);
- `_calculate_rewards` keeps the gathered reward matrix;
- `_generate_and_score_completions` replaces GRPO's advantages with the tree estimator's and applies dynamic
  sampling. Padding, rewards, old/ref logprobs, vLLM importance sampling, the loss and logging stay TRL's own;
- `_get_per_token_logps_and_entropies`, with `tree_packed_training`, forwards each prompt's token trie once
  (`packing.py`) and hands TRL the same per-token log-probabilities;
- `create_model_card` adds the TreePO configuration to TRL's card.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import textwrap
import types
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models import unwrap_model_for_generation
from trl.trainer import grpo_trainer
from trl.trainer.utils import is_async_callable, nanstd

from .advantages import compute_segment_advantages, compute_tree_advantages, whiten
from .architecture import packing_obstacle
from .backends.transformers import TransformersSegmentEngine
from .backends.vllm import (
    RolloutGroup,
    ServerRequestError,
    colocate_rollout,
    engine_runs_on_cpu,
    local_server_rollout,
    server_command,
    server_rollout,
    sync_weights_by_reload,
)
from .config import TreePOConfig, configuration_card, grpo_differences_message
from .packing import PACKING_TOLERANCE, WRAPPED_ATTENTION, install_tree_attention, pack_rows, shuffle_whole_trees
from .tools import PromptTools, ToolExecutor
from .tree import FinishReason, Leaf, RolloutStats, TreeRollout, grow_trees
from .visualize import render_tree_html


logger = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it."""


def _naming_failures(func, name: str):
    """`func`, sync or async as it was, re-raising any exception as a `RewardFunctionError` that names it."""

    def failure(error):
        return RewardFunctionError(f"The reward function '{name}' raised {type(error).__name__}: {error}")

    if is_async_callable(func):

        async def wrapped(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error

    else:

        def wrapped(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except Exception as error:
                raise failure(error) from error

    functools.update_wrapper(wrapped, func if hasattr(func, "__name__") else func.__call__)
    return wrapped


@contextlib.contextmanager
def _shuffling_whole_trees():
    """Within the block, GRPOTrainer's generation-batch shuffle permutes whole trees instead of rows."""
    if not hasattr(grpo_trainer, "shuffle_sequence_dict"):  # a TRL release that moved it: fail loudly, not silently
        raise RuntimeError("trl.trainer.grpo_trainer.shuffle_sequence_dict is gone; tree-aware micro-batches need it.")
    original, grpo_trainer.shuffle_sequence_dict = grpo_trainer.shuffle_sequence_dict, shuffle_whole_trees
    try:
        yield
    finally:
        grpo_trainer.shuffle_sequence_dict = original


@dataclass
class _TreeBatch:
    """What the rollout hands to the advantage step: one entry per local row, in row order."""

    paths: list[tuple]
    padded: list[bool]  # rows that repeat a leaf to fill a prompt short of w leaves (fallback "none"); never trained
    row_leaves: list[Leaf]  # every row's leaf, padding rows included
    stats: RolloutStats

    @property
    def leaves(self) -> list[Leaf | None]:
        """Each row's leaf, None for padding rows."""
        return [None if padded else leaf for leaf, padded in zip(self.row_leaves, self.padded)]

    @property
    def truncated(self) -> list[bool]:
        """Rows the length limit stopped; answer, repetition and stop-string stops are finished."""
        return [leaf.finish_reason is FinishReason.LENGTH for leaf in self.row_leaves]


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
        uses_tools = bool(kwargs.get("tools")) or kwargs.get("environment_factory") is not None
        if args.tree_sampling and uses_tools and args.use_vllm and args.vllm_mode == "colocate":
            if args.vllm_tensor_parallel_size > 1:  # checked before TRL starts the engine
                raise ValueError(
                    "Tree rollouts with tools and vllm_tensor_parallel_size > 1 are not supported: the ranks of a "
                    "tensor-parallel group grow each other's trees, but each rank holds only its own examples' tools "
                    "and environments. Use vllm_tensor_parallel_size=1, vllm_mode='server', or tree_sampling=False."
                )
        try:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        except OSError as error:  # TRL raises `requests`' ConnectionError, an OSError but not the builtin one
            if not (args.use_vllm and args.vllm_mode == "server" and "can't be reached" in str(error)):
                raise
            model_id = model if isinstance(model, str) else model.config._name_or_path
            raise ConnectionError(
                f"{error}\nStart a vLLM server for this model first, with prefix caching on (tree rollouts resubmit "
                f"shared prefixes):\n    {server_command(model_id)}\nor point vllm_server_base_url at a running one. "
                "See docs/vllm.md."
            ) from error
        if args.tree_sampling and self.rollout_func is not None:
            raise ValueError(
                "A rollout_func replaces TRL's generation, so no tree would be grown and GRPO's advantages would train "
                "under the TreePO name. Remove rollout_func, or set tree_sampling=False to train exactly as "
                "GRPOTrainer does with it."
            )
        if self.accelerator.is_main_process:
            logger.warning(grpo_differences_message(args))
        self._tree_batch: _TreeBatch | None = None
        self._tree_inputs = None
        self._rewards_per_func: torch.Tensor | None = None
        self._rollout_step, self._rollouts_at_step = None, 0  # see `_next_rollout`
        self.reward_funcs = [
            func if isinstance(func, torch.nn.Module) else _naming_failures(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]
        if self.use_vllm and self.vllm_mode == "colocate" and engine_runs_on_cpu():
            # TRL's colocate sync cannot load into vLLM-CPU's prepacked layers; GPU engines keep TRL's own sync.
            self.vllm_generation.sync_weights = types.MethodType(sync_weights_by_reload, self.vllm_generation)
        self._packing_verified: bool | None = None  # the first packed forward's self-check: not yet run, passed, failed
        self._packing_warnings: set[str] = set()
        self._packing_obstacles: dict[int, str | None] = {}  # per model (policy, reference)
        if args.tree_packed_training:
            install_tree_attention()
        self._rollout_group = None
        if self.use_vllm and self.vllm_mode == "server" and args.tree_sampling:
            timeout = args.tree_rollout_timeout if args.tree_rollout_timeout is not None else args.ddp_timeout
            self._rollout_group = RolloutGroup(self.accelerator, timeout)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (tags `trl` and `treepo`, the TreePO citation), plus the run's TreePO configuration."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as card:
            text = card.read()
        # TRL's card names the base model only when it comes from the Hub; do not link a local one as "None".
        text = re.sub(
            r"This model is a fine-tuned version of \[None\]\(https://huggingface\.co/None\)( on the .*? dataset)?\.\n",
            lambda match: f"This model was trained{match.group(1)}.\n" if match.group(1) else "",
            text,
        )
        text = text.replace('model="None"', f'model="{self.hub_model_id or self.args.output_dir}"')
        section = (
            "### TreePO configuration\n\nEach prompt grew a tree of segments whose leaves are its completions "
            "([TreePO](https://huggingface.co/papers/2508.17445), trained with the `trl-treepo` package):\n\n"
            f"{configuration_card(self.args)}\n\n"
        )
        marker = "### Framework versions"
        text = text.replace(marker, section + marker) if marker in text else text + "\n" + section
        with open(path, "w", encoding="utf-8") as card:
            card.write(text)

    # --------------------------------------------------------------------------------------------------- rollout

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        grows_tree = self.args.tree_sampling and self.model.training and num_generations == self.num_generations
        if not grows_tree:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if images is not None or multimodal_fields:
            raise ValueError(
                "Tree rollouts support text-only prompts. Set tree_sampling=False to train vision-language data."
            )
        self._check_prompts(prompt_ids)
        with profiling_context(self, "tree.rollout"):
            rows, stats, rollout_key = self._grow_rows(prompt_ids, num_generations)
        paths = [
            (("pad", rollout_key, self.accelerator.process_index, i), i)
            if padded
            else ((rollout_key, leaf.prompt_index), *leaf.nodes)
            for i, (leaf, padded) in enumerate(rows)
        ]
        row_leaves = [leaf for leaf, _ in rows]
        self._tree_batch = _TreeBatch(paths, [padded for _, padded in rows], row_leaves, stats)
        if self.tools and self.environments is not None:
            # TRL hands `environments` to the reward functions (and `get_reward`): each row gets its leaf's instance.
            self.environments = [leaf.tool_state.instance for leaf in row_leaves]
        completion_ids = [list(leaf.token_ids) for leaf, _ in rows]
        # TRL feeds sampling logprobs to vLLM importance sampling; the transformers path has none, as in TRL.
        logprobs = [leaf.logprobs for leaf, _ in rows] if self.use_vllm else None
        return completion_ids, logprobs

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        """Tree leaves ran their tools inside the tree, once per node: hand TRL their conversations, tool masks and
        tool counts, in the shape `GRPOTrainer._tool_call_loop` returns. Sequential generation (evaluation,
        tree_sampling=False) keeps TRL's loop."""
        batch = self._tree_batch
        if batch is None:
            return super()._tool_call_loop(
                prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields
            )
        completions = [
            self._conversation(leaf, prompt_ids[row], self._tool_schema(row))
            for row, leaf in enumerate(batch.row_leaves)
        ]
        tool_mask = [
            [1] * len(leaf.token_ids) if leaf.tool_mask is None else list(leaf.tool_mask) for leaf in batch.row_leaves
        ]
        no_images = [[] for _ in completion_ids]
        stats = batch.stats
        return tool_mask, completions, completion_ids, logprobs, stats.tool_calls, stats.tool_failures, no_images

    def _tool_schema(self, row: int) -> list:
        """The tools row `row`'s prompt was rendered with, as TRL chooses them: its environment's, or every tool."""
        if self.environment_factories is not None:
            return self._env_tools[self._batch_environments[row]]
        return self.tools

    def _conversation(self, leaf: Leaf, prompt_ids: list[int], schema) -> list[dict]:
        """A leaf's messages as TRL's tool loop builds them: each tool turn's assistant and tool messages, then the
        final assistant turn, parsed as TRL parses a completion."""
        messages = []
        for _, turn in leaf.tool_turns:
            messages += [turn.record.assistant, *turn.record.tool_messages]
        start = leaf.segment_ends[leaf.tool_turns[-1][0]] if leaf.tool_turns else 0
        if start < len(leaf.token_ids):
            prefix = list(prompt_ids) + leaf.token_ids[:start]
            final_turn = leaf.token_ids[start:]
            messages.append(grpo_trainer.parse_response(self._tokenizer, final_turn, prefix=prefix, tools=schema))
        return messages

    def _unique_prompts(self, prompt_ids, num_generations):
        roots = prompt_ids[::num_generations]
        for i, root in enumerate(roots):
            for row in prompt_ids[i * num_generations : (i + 1) * num_generations]:
                if list(row) != list(root):
                    if self.environment_factories is not None:
                        raise ValueError(
                            "The num_generations rollouts of one example got different prompts: its environment's "
                            "reset() returned different observations for them. A tree grows all of an example's "
                            "rollouts from one shared prompt, so reset() must return the same observation for the same "
                            "example (seed any randomness from the example), or set tree_sampling=False."
                        )
                    raise RuntimeError(
                        "TreePOTrainer expects each process's prompts in groups of num_generations identical rows, as "
                        "TRL's RepeatSampler produces them. A custom sampler or dataloader broke that layout."
                    )
        return [list(root) for root in roots]

    def _next_rollout(self) -> tuple[int, int]:
        """(training step, rollouts before this one in the step): names a rollout in paths and seeds its sampler.

        The same on every process, and a function of the step rather than of a counter that a resumed run would
        restart, so a resumed run grows the trees the uninterrupted one would have.
        """
        step = self.state.global_step
        if self._rollout_step != step:
            self._rollout_step, self._rollouts_at_step = step, 0
        self._rollouts_at_step += 1
        return step, self._rollouts_at_step - 1

    def _sampling_params(self, rollout: tuple[int, int]):
        # The sampler's own choices vary per rollout and process, reproducibly under args.seed. The ranks of a
        # colocated tensor-parallel group grow the same trees, so they share a seed.
        rank = self.accelerator.process_index
        if self.use_vllm and self.vllm_mode == "colocate":
            rank //= self.args.vllm_tensor_parallel_size
        step, index = rollout
        seed = (self.args.seed * 1_000_003 + step * 7919 + index * 104_729 + rank) % 2**31
        return self.args.tree_sampling_params(self.eos_token_ids, seed)

    def _check_prompts(self, prompt_ids) -> None:
        """Clear errors for prompts a tree cannot grow from; TRL itself neither truncates nor filters prompts."""
        for row, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(
                    f"Row {row} of this batch has an empty prompt (0 tokens); a tree needs a prompt to grow from. "
                    "Remove empty prompts from the dataset."
                )
        longest = max(len(ids) for ids in prompt_ids)
        budget = longest + self.args.max_completion_length
        if self.use_vllm and self.vllm_mode == "colocate":
            limit = self.vllm_generation.llm.llm_engine.model_config.max_model_len
            if budget > limit:
                raise ValueError(
                    f"A prompt of {longest} tokens plus max_completion_length ({self.args.max_completion_length}) "
                    f"needs {budget} tokens, beyond the vLLM engine's max_model_len ({limit}). TRL does not truncate "
                    "prompts: filter long prompts out of the dataset, raise vllm_max_model_length, or lower "
                    "tree_max_depth / tree_segment_length."
                )
        else:
            limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
            if limit is not None and budget > limit and not getattr(self, "_warned_context", False):
                self._warned_context = True
                logger.warning(
                    f"A prompt of {longest} tokens plus max_completion_length ({self.args.max_completion_length}) "
                    f"reaches {budget} tokens, beyond the model's max_position_embeddings ({limit}). Generation "
                    "continues, but quality past that length is not guaranteed; consider filtering long prompts."
                )

    def _grow_rows(self, prompt_ids, num_generations):
        """This process's rows as (leaf, padded), the rollout's work counters, and a key naming the rollout."""
        rollout_id = self._next_rollout()
        params = self._sampling_params(rollout_id)
        if self.use_vllm:
            # Once per training step, never per segment.
            if self.state.global_step != self._last_loaded_step:
                with profiling_context(self, "sync_weights"):
                    self._sync_vllm_weights()
                self._last_loaded_step = self.state.global_step
            if self.vllm_mode == "server" and not self.tools:
                rows, stats = server_rollout(
                    self.vllm_generation,
                    prompt_ids,
                    num_generations,
                    params,
                    self._tokenizer.decode,
                    self._rollout_group,
                    request_timeout=self.args.tree_server_request_timeout,
                    max_retries=self.args.tree_server_max_retries,
                )
                return rows, stats, ("server", rollout_id)
        roots = self._unique_prompts(prompt_ids, num_generations)
        tools = self._tool_executor(len(roots), num_generations) if self.tools else None
        if self.use_vllm and self.vllm_mode == "server":
            # Tools run where their examples' environments live, so each process grows its own trees on the server.
            rollout = local_server_rollout(
                self.vllm_generation,
                roots,
                params,
                self._tokenizer.decode,
                tools,
                self._rollout_group,
                request_timeout=self.args.tree_server_request_timeout,
                max_retries=self.args.tree_server_max_retries,
            )
        elif self.use_vllm:
            rollout = colocate_rollout(self.vllm_generation, roots, params, self._tokenizer.decode, tools)
        else:
            rollout = self._grow_trees_with_transformers(roots, params, tools)
        if tools is not None and tools.timeouts:
            logger.warning(
                f"{tools.timeouts} tool call(s) ran past tree_tool_timeout ({self.args.tree_tool_timeout} s) in this "
                "rollout; they count as failed calls and their result is an error message. Raise tree_tool_timeout if "
                "the tool is slow rather than hung."
            )
        return rollout.rows(num_generations), rollout.stats, (self.accelerator.process_index, rollout_id)

    def _tool_executor(self, num_roots: int, num_generations: int) -> ToolExecutor:
        """The tools of each tree, from what `GRPOTrainer` set up for this batch: tree i uses row i·G's."""
        prompts = []
        for root in range(num_roots):
            row = root * num_generations
            environment, factory, reset_kwargs = None, None, {}
            if self.environment_factories is not None:
                name = self._batch_environments[row]
                environment, factory = self.environments[row], self.environment_factories[name]
                reset_kwargs = dict(self._tree_inputs[row])
                if self._multi_environment:  # TRL's control field, not a `reset` argument
                    reset_kwargs.pop("environment", None)
            prompts.append(
                PromptTools(list(self._standalone_tools), self._tool_schema(row), environment, factory, reset_kwargs)
            )

        def parse(ids, prefix, schema):
            return grpo_trainer.parse_response(self._tokenizer, ids, prefix=prefix, tools=schema)

        return ToolExecutor(
            prompts,
            parse,
            self._get_tool_suffix_ids,
            timeout=self.args.tree_tool_timeout,
            environment_branching=self.args.tree_environment_branching,
            async_loop=getattr(self, "async_loop", None),
        )

    def _sync_vllm_weights(self) -> None:
        try:
            self.vllm_generation.sync_weights()
        except OSError as error:  # `requests`' errors are OSErrors: the server went away or refused
            if self.vllm_mode != "server":
                raise
            raise ServerRequestError(
                f"Weight sync with the vLLM server at {self.vllm_generation.vllm_client.base_url} failed at step "
                f"{self.state.global_step}: {type(error).__name__}: {error}. Is the server still running? Restart it "
                "and resume from the last checkpoint (trainer.train(resume_from_checkpoint=True))."
            ) from error

    def _grow_trees_with_transformers(self, roots: list[list[int]], params, tools=None) -> TreeRollout:
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            engine = TransformersSegmentEngine(
                unwrapped_model,
                self.generation_config,
                self._tokenizer.pad_token_id,
                reuse_kv_cache=self.args.tree_reuse_kv_cache,
                return_logprobs=params.needs_logprobs,
            )
            return grow_trees(engine, roots, params, self._tokenizer.decode, tools)

    # ------------------------------------------------------------------------------------------------ advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._tree_batch is not None:
            # A padding row repeats a leaf of a prompt short of w leaves (fallback "none"). As NaN it stays out of
            # every group statistic, TRL's own ("grpo" estimator, logged rewards) included, as if never sampled.
            padded = self.accelerator.gather(torch.tensor(self._tree_batch.padded, device=rewards_per_func.device))
            rewards_per_func = rewards_per_func.masked_fill(padded.unsqueeze(1), torch.nan)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        if not (self.args.tree_sampling and self.model.training):
            return super()._generate_and_score_completions(inputs)  # GRPOTrainer's step, unchanged
        self._tree_batch = None
        self._tree_inputs = inputs  # the examples, for `reset` when an environment is rebuilt ("replay")
        # A leaf that the tree stopped on purpose (answer, repetition, stop string) ends without EOS, and TRL would
        # take it for truncated. TRL's masking is off for this call; `_replace_advantages` masks the leaves the
        # length limit cut, from their finish reasons.
        mask_truncated, self.mask_truncated_completions = self.mask_truncated_completions, False
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.mask_truncated_completions = mask_truncated
        batch, self._tree_batch = self._tree_batch, None
        paths = [path for process_paths in gather_object([batch.paths]) for path in process_paths]
        truncated = self.accelerator.gather(torch.tensor(batch.truncated, device=self.accelerator.device))
        self._log_truncation(output, truncated)
        with profiling_context(self, "tree.advantages"):
            self._replace_advantages(output, batch, paths, truncated if mask_truncated else None)
        self._log_tree_metrics(batch, paths)
        # `state.logging_steps` is the Trainer's own resolution of `logging_steps` (a ratio becomes a step count).
        logs_this_step = self.state.global_step % self.state.logging_steps == 0
        if self.args.log_completions and self.accelerator.is_main_process and logs_this_step:
            self._write_tree_picture(batch, output)
        return output

    def _log_truncation(self, output: dict, truncated: torch.Tensor) -> None:
        """TRL's truncation metrics, which `_generate` derived from "the last token is not EOS", from finish reasons."""
        policy_mask = output["completion_mask"] * output.get("tool_mask", 1)  # TRL counts tool results out
        lengths = self.accelerator.gather(policy_mask.sum(dim=1)).float()
        terminated = lengths[~truncated] if not truncated.all() else torch.zeros(1, device=lengths.device)
        metrics = self._metrics["train"]
        metrics["completions/clipped_ratio"][-1] = truncated.float().mean().item()
        metrics["completions/mean_terminated_length"][-1] = terminated.mean().item()
        metrics["completions/min_terminated_length"][-1] = terminated.min().item()
        metrics["completions/max_terminated_length"][-1] = terminated.max().item()

    def _summed_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """One reward per row, combining the reward functions as `multi_objective_aggregation` says; NaN where no
        function scored the row.

        `sum_then_normalize`: the weighted sum, as TRL sums. `normalize_then_sum`: each function is first z-scored
        over the prompt's scored leaves, as TRL does, then weighted and summed; the tree estimator and its
        normalisation then play the part of TRL's final batch z-score.
        """
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        if self.args.multi_objective_aggregation == "normalize_then_sum":
            grouped = rewards_per_func.view(-1, self.num_generations, rewards_per_func.size(1))
            standardized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
                nanstd(grouped, dim=1, keepdim=True) + 1e-4
            )
            rewards_per_func = standardized.view_as(rewards_per_func)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return rewards

    def _replace_advantages(
        self, output: dict, batch: _TreeBatch, paths: list[tuple], truncated: torch.Tensor | None
    ) -> None:
        """Tree advantages for every row, and the loss mask of the rows that do not train.

        `truncated` (every process's rows) is given when `mask_truncated_completions` is on.
        """
        args, device = self.args, self.accelerator.device
        num_local = output["completion_ids"].size(0)
        rank = self.accelerator.process_index
        process_slice = slice(rank * num_local, (rank + 1) * num_local)

        # Rewards of every row of every process; padding rows are NaN already (`_calculate_rewards`).
        rewards = self._summed_rewards(self._rewards_per_func)
        padded = self.accelerator.gather(torch.tensor(batch.padded, device=device))
        # TRL's None means "not scored": such a row joins no group statistic and is masked out of the loss, so it adds
        # neither a KL term nor tokens to the normaliser (GRPOTrainer only zeroes its advantage).
        scored = ~torch.isnan(rewards)
        unscored = (~scored & ~padded).float().sum() / (~padded).float().sum()
        self._metrics["train"]["tree/unscored_leaf_ratio"].append(unscored.item())

        # Dynamic sampling (paper §3.1): a prompt whose scored leaves all share one reward teaches nothing.
        if args.tree_filter_zero_std_prompts:
            grouped = rewards.view(-1, self.num_generations)
            lowest = torch.nan_to_num(grouped, nan=torch.inf).min(dim=1).values
            highest = torch.nan_to_num(grouped, nan=-torch.inf).max(dim=1).values
            informative = highest > lowest
            self._metrics["train"]["tree/filtered_prompt_ratio"].append(1.0 - informative.float().mean().item())
            scored &= informative.repeat_interleave(self.num_generations)
        # Truncated leaves still count in their groups' statistics, as in GRPO; they only do not train.
        keep = scored if truncated is None else scored & ~truncated
        rewards = torch.where(scored, rewards, torch.full_like(rewards, torch.nan))

        local_keep = keep[process_slice]
        if not keep.all():  # global, so every process joins the gather below
            tool_mask = output.get("tool_mask", torch.ones_like(output["completion_mask"]))
            output["tool_mask"] = tool_mask * local_keep.unsqueeze(1).to(tool_mask.dtype)
            loss_mask = output["completion_mask"] * output["tool_mask"]
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

        if args.tree_advantage_estimator == "grpo":
            output["advantages"] = output["advantages"] * local_keep
            logged = list(self._logs["advantages"])[-keep.numel() :]
            self._replace_logged_advantages(torch.tensor(logged) * keep.cpu())
            return

        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        rewards = rewards.double().cpu()
        if args.tree_advantage_estimator == "tree":
            advantages = compute_tree_advantages(
                rewards,
                paths,
                weighting=args.tree_advantage_weighting,
                reject_zero_std_subgroups=args.tree_reject_zero_std_subgroups,
            )
            if args.tree_advantage_normalization == "batch_whiten":
                token_counts = self.accelerator.gather(loss_mask.sum(dim=1)).double().cpu()
                advantages = whiten(advantages, token_counts)
            advantages = torch.nan_to_num(advantages, nan=0.0).float()
            output["advantages"] = advantages[process_slice].to(device)
            self._replace_logged_advantages(advantages)
            return

        # "tree_segment": one value per segment, handed to the loss as [B, T]
        lengths = self.accelerator.gather(output["completion_mask"].sum(dim=1)).cpu()
        segment_ends = [ends for process_ends in gather_object([[leaf.segment_ends for leaf in batch.row_leaves]])
                        for ends in process_ends]  # fmt: skip
        advantages = compute_segment_advantages(
            rewards, paths, lengths.tolist(), args.tree_segment_length,
            discount=args.tree_segment_advantage_discount, segment_ends=segment_ends,
        )  # fmt: skip
        token_weights = (torch.arange(advantages.size(1))[None, :] < lengths[:, None]).double() * keep.cpu()[:, None]
        if args.tree_advantage_normalization == "batch_whiten":
            advantages = whiten(advantages, token_weights)
        advantages = (torch.nan_to_num(advantages, nan=0.0) * token_weights).float()
        width = output["completion_ids"].size(1)
        local = torch.zeros(num_local, width)
        columns = min(width, advantages.size(1))
        local[:, :columns] = advantages[process_slice, :columns]
        output["advantages"] = local.to(device)
        self._replace_logged_advantages(advantages.sum(dim=1) / token_weights.sum(dim=1).clamp(min=1).float())

    def _replace_logged_advantages(self, advantages: torch.Tensor) -> None:
        """Swap the GRPO advantages TRL just logged for the ones that train (one value per row, all processes)."""
        logged = self._logs["advantages"]
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.tolist())

    # ------------------------------------------------------------------------------------------ packed training

    _PACKABLE_ATTENTION = WRAPPED_ATTENTION

    def _prepare_inputs(self, generation_batch):
        if not (self.args.tree_packed_training and self.model.training):
            return super()._prepare_inputs(generation_batch)
        # TRL shuffles the generation batch row by row before cutting it into micro-batches, so a micro-batch would
        # hold scattered leaves of many trees; shuffled tree by tree, each gradient pass packs whole tries.
        with _shuffling_whole_trees():
            return super()._prepare_inputs(generation_batch)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal_inputs,
    ):  # fmt: skip
        """With `tree_packed_training`, one forward over each prompt's token trie instead of one per row (exact).

        Everything else, and whatever packing cannot compute exactly, goes to TRL's own method.
        """
        packing = self.args.tree_packed_training and self._packing_verified is not False
        if packing and self._packable(model, compute_aux_loss, multimodal_inputs):
            packed = self._packed_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy
            )
            if packed is not None:
                return packed
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
            **multimodal_inputs,
        )  # fmt: skip

    def _packed_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy):
        """Packed log-probs and entropies; None when the first-use self-check finds them off the unpacked ones."""
        batch_size = batch_size or input_ids.size(0)  # TRL's memory chunking, kept; sharing is found within a chunk
        logps, entropies, packed_tokens, row_tokens = [], [], 0, 0
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            packed = pack_rows(input_ids[rows], attention_mask[rows], logits_to_keep,
                               max_tokens=self.args.tree_packed_max_tokens)  # fmt: skip
            outputs = []
            for sequence in packed.sequences:
                with self.accelerator.autocast():
                    outputs.append(
                        model(
                            input_ids=sequence.input_ids,
                            attention_mask=sequence.attention_mask,
                            position_ids=sequence.position_ids,
                            shift_labels=sequence.shift_labels,
                            fused_lm_head=True,
                            tree_attention=sequence.tree,
                        )
                    )
            logps.append(packed.unpack([output.log_probs for output in outputs]))
            if compute_entropy:
                entropies.append(packed.unpack([output.entropy for output in outputs]))
            packed_tokens += packed.packed_tokens
            row_tokens += packed.row_tokens
        logps = torch.cat(logps)
        if self._packing_verified is None:
            self._packing_verified = self._packing_matches_unpacked(
                model, input_ids, attention_mask, logits_to_keep, batch_size, logps
            )
            if not self._packing_verified:
                return None
        if torch.is_grad_enabled():  # the loss's forward (old and reference log-probs run without grad)
            self._metrics["train"]["tree/packed_token_ratio"].append(packed_tokens / max(row_tokens, 1))
        return logps, torch.cat(entropies) if compute_entropy else None, None

    def _packing_matches_unpacked(self, model, input_ids, attention_mask, logits_to_keep, batch_size, logps) -> bool:
        """First-use self-check: the packed log-probs of this batch against TRL's unpacked forward.

        Within `PACKING_TOLERANCE` of the model's precision, packing is on for the run; beyond it, it is off for the
        run, with a warning that gives the gap, since the architecture checks cannot foresee every model.
        """
        with torch.no_grad():
            reference = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size
            )[0]
        valid = attention_mask[:, -logits_to_keep:].bool()
        gaps = (logps.detach() - reference)[valid].abs().float()
        if gaps.numel() == 0:
            return True
        precision = self.accelerator.unwrap_model(model).dtype
        if self.accelerator.mixed_precision in ("bf16", "fp16"):
            precision = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float16
        max_gap, mean_gap = PACKING_TOLERANCE.get(precision, PACKING_TOLERANCE[torch.bfloat16])
        if gaps.max() <= max_gap and gaps.mean() <= mean_gap:
            return True
        logger.warning(
            f"tree_packed_training is off for this run: on the first batch, packed log-probs differ from the unpacked "
            f"ones by up to {gaps.max().item():.3g} (mean {gaps.mean().item():.3g}; tolerance {max_gap} / {mean_gap} "
            f"in {precision}). This model's attention or positions do not allow exact packing; training continues "
            "unpacked. Please report the model at the trl-treepo issue tracker."
        )
        return False

    def _packable(self, model, compute_aux_loss: bool, multimodal_inputs: dict) -> bool:
        """Whether this forward can be packed exactly; if not, a one-time warning says why (spec: exact or refused)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if id(unwrapped) not in self._packing_obstacles:  # the architecture does not change during a run
            self._packing_obstacles[id(unwrapped)] = packing_obstacle(unwrapped, self._PACKABLE_ATTENTION)
        reason = self._packing_obstacles[id(unwrapped)]
        if reason is None and compute_aux_loss:
            reason = "the MoE load-balancing loss is computed per row"
        if reason is None and any(value is not None for value in multimodal_inputs.values()):
            reason = "multimodal inputs are not packed"
        if reason is not None and reason not in self._packing_warnings:
            self._packing_warnings.add(reason)
            logger.warning(f"tree_packed_training falls back to the unpacked forward for this model: {reason}.")
        return reason is None

    # --------------------------------------------------------------------------------------------------- metrics

    def _write_tree_picture(self, batch: _TreeBatch, output: dict) -> None:
        """The main process's first tree of this step, with rewards and advantages, as `trees/step-<N>.html`.

        Alongside TRL's completion logging (`log_completions=True`), for looking at what the rollout did.
        """
        width = self.num_generations
        rows = [row for row in range(min(width, len(batch.leaves))) if not batch.padded[row]]
        leaves = [batch.leaves[row] for row in rows]
        if not leaves or any(leaf is None for leaf in leaves):
            return
        rewards = self._summed_rewards(self._rewards_per_func)[rows].cpu()
        advantages = output["advantages"][rows].float().cpu()
        if advantages.dim() == 2:  # per token: show each leaf's mean over its tokens
            mask = output["completion_mask"][rows].float().cpu()
            advantages = (advantages * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        prompt_ids = output["prompt_ids"][rows[0]][output["prompt_mask"][rows[0]].bool()].tolist()
        step = self.state.global_step + 1
        page = render_tree_html(
            leaves,
            self.args.tree_segment_length,
            self._tokenizer.decode,
            rewards.tolist(),
            advantages.tolist(),
            title=f"Step {step}: one TreePO rollout tree",
            prompt_text=self._tokenizer.decode(prompt_ids),
        )
        folder = os.path.join(self.args.output_dir, "trees")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step-{step:06d}.html"), "w") as handle:
            handle.write(page)

    def _log_tree_metrics(self, batch: _TreeBatch, paths: list[tuple]) -> None:
        """`tree/*` metrics over the whole batch: the engine's work, and the shape of the trees."""
        device = self.accelerator.device
        stats = batch.stats
        leaves = [leaf for leaf in batch.leaves if leaf is not None]
        reasons = [sum(leaf.finish_reason is reason for leaf in leaves) for reason in FinishReason]
        local = torch.tensor(
            [
                stats.decoded_tokens,
                stats.leaf_tokens,
                stats.engine_calls,
                stats.fallback_events,
                sum(leaf.from_fallback for leaf in leaves),
                len(leaves),
                sum(leaf.depth for leaf in leaves),
                max((leaf.depth for leaf in leaves), default=0),
                *reasons,
                stats.tool_calls,
                stats.sequential_tool_calls,
                stats.tool_failures,
            ],
            dtype=torch.float64,
            device=device,
        )
        per_process = self.accelerator.gather(local.unsqueeze(0))
        totals = per_process.sum(dim=0).tolist()
        decoded, leaf_tokens, _, fallbacks, fallback_leaves, num_leaves, depth_sum = totals[:7]
        children: dict[tuple, set] = {}
        for path in paths:
            if path[0][0] != "pad":
                for depth in range(1, len(path)):
                    children.setdefault(path[:depth], set()).add(path[depth])
        metrics = self._metrics["train"]
        metrics["tree/decoded_tokens"].append(decoded)
        metrics["tree/leaf_tokens"].append(leaf_tokens)
        metrics["tree/decoded_token_ratio"].append(decoded / max(leaf_tokens, 1))
        metrics["tree/engine_calls"].append(per_process[:, 2].max().item())
        metrics["tree/fallback_events"].append(fallbacks)
        metrics["tree/fallback_leaf_ratio"].append(fallback_leaves / max(num_leaves, 1))
        metrics["tree/mean_depth"].append(depth_sum / max(num_leaves, 1))
        metrics["tree/max_depth"].append(per_process[:, 7].max().item())
        metrics["tree/mean_branching"].append(
            sum(len(kids) for kids in children.values()) / max(len(children), 1)
        )
        for reason, count in zip(FinishReason, totals[8:]):
            if reason is not FinishReason.TOOL_LIMIT or self.tools:
                metrics[f"tree/finish_reason/{reason.value}"].append(count / max(num_leaves, 1))
        if self.tools:
            # The saving: tool calls run once per tree node, against once per leaf in sequential rollouts of the same
            # trajectories.
            tool_calls, sequential_calls, tool_failures = totals[8 + len(FinishReason) :]
            metrics["tree/tool_calls"].append(tool_calls)
            metrics["tree/sequential_tool_calls"].append(sequential_calls)
            metrics["tree/tool_call_ratio"].append(tool_calls / sequential_calls if sequential_calls else 1.0)
            metrics["tree/tool_failures"].append(tool_failures)
