"""A learning setting: the task, the tiny model and its warm-up, the held-out set, the RL run and the arms compared.

`PRESETS` holds the named settings (`habit`, the demo's; `unfinished`; `chains`, the multi-step setting where trees
have intermediate steps to branch at; and `sums`, the earlier two-term setting); every field can be overridden from
the command line, and any reasoning-gym task can stand in for the preset's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

# The arms every study can run: TRL's GRPO and TreePO, and the paper's cheap ablations. An arm is a set of
# `TreePOConfig` overrides on top of the setting's configuration.
ARMS = {
    "treepo": {},
    # Exactly TRL's GRPOTrainer, as users run it: sequential samples, GRPO's advantages, no packing.
    "grpo": {"tree_sampling": False, "tree_packed_training": False},
    "tree_sampling_grpo_advantage": {"tree_advantage_estimator": "grpo"},
    "tree_advantage_group_size": {"tree_advantage_weighting": "group_size"},
    "random_initial_divergence": {"tree_initial_divergence": 2, "tree_initial_divergence_max": 8},
    "low_prob_divergence": {"tree_divergence_policy": "low_prob"},
    "high_prob_divergence": {"tree_divergence_policy": "high_prob"},
    # The same trees grown level by level instead of per tree (`tree_rollout_schedule`; vLLM): equal in distribution.
    "treepo_level": {"tree_rollout_schedule": "level"},
    # Finer credit assignment: one advantage per segment (paper §3.3's tree, spec §6.4).
    "tree_segment": {"tree_advantage_estimator": "tree_segment"},
    "node_value": {"tree_advantage_estimator": "node_value"},
}
ARM_LABELS = {
    "treepo": "TreePO",
    "grpo": "TRL GRPO",
    "tree_sampling_grpo_advantage": "tree sampling, GRPO advantage",
    "tree_advantage_group_size": "TreePO, group-size weighting (Eq. 6)",
    "random_initial_divergence": "TreePO, random initial divergence 2-8",
    "low_prob_divergence": "TreePO, low-prob divergence (§4.4)",
    "high_prob_divergence": "TreePO, high-prob divergence (§4.4)",
    "treepo_level": "TreePO, level-by-level rollout",
    "tree_segment": "TreePO, released per-segment advantages",
    "node_value": "TreePO, per-node values (global + local)",
}


BUDGETS = ("steps", "decoded_tokens", "wall_time")


@dataclass(frozen=True)
class Setting:
    """Everything one study run needs besides the arm and the seed.

    Attributes:
        task, task_config: the reasoning-gym task and its configuration.
        conversational: prompts as chat conversations (with a system message), or as plain text (shorter: for tiny
            models that learn the answer format from the warm-up).
        model: `testing.make_tiny_model` arguments (vocabulary, hidden size, layers, heads).
        warmup: the SFT warm-up (`testing.make_warm_model`): examples, steps, batch size, learning rate, the share
            of its answers that stop one step early (`unfinished_share`, sums only: `ReasoningTask.unfinished_answer`),
            and optionally the `seed` of one warm model that every RL seed shares (otherwise each seed has its own).
        held_out: size (distinct problems, none of them a training prompt), seed, samples per problem, new tokens.
        rl: prompts per step, completions per prompt, learning rate, steps, segment length and depth.
        config: further `TreePOConfig` fields for every arm.
        arms: the arms this setting compares (name → `TreePOConfig` overrides).
        budget: what every arm spends (`BUDGETS`): `"steps"` (`rl.max_steps` each), or `"decoded_tokens"` /
            `"wall_time"` (training time, evaluation excluded): GRPO runs `rl.max_steps` first on each seed, and
            every other arm runs until it has spent what GRPO spent on that seed (or a budget given to the study).
    """

    name: str
    description: str
    task: str
    task_config: dict
    model: dict
    warmup: dict
    held_out: dict
    rl: dict
    config: dict = field(default_factory=dict)
    arms: dict = field(default_factory=lambda: dict(ARMS))
    conversational: bool = True
    budget: str = "steps"

    @property
    def max_completion_length(self) -> int:
        return self.rl["segment_length"] * self.rl["max_depth"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Setting:
        return cls(**json.loads(text))

    def with_overrides(self, **sections) -> Setting:
        """This setting with some fields replaced and some sections updated (dict sections merge key by key)."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = {**current, **value} if isinstance(current, dict) and isinstance(value, dict) else value
        return replace(self, **changes)


PRESETS = {
    "chains": Setting(
        name="chains",
        description="sums of three or four one-digit numbers, reduced one addition at a time",
        task="basic_arithmetic",
        task_config=dict(min_terms=3, max_terms=4, min_digits=1, max_digits=1, operators=["+"],
                         allow_parentheses=False, allow_negation=False),  # fmt: skip
        conversational=False,
        # A 512-rank vocabulary spells numbers and operators out one character at a time; a smaller LM head also
        # makes every step cheaper on a CPU.
        model=dict(vocab_size=512, hidden_size=128, num_layers=2, num_attention_heads=4, num_key_value_heads=2),
        warmup=dict(examples=20_800, steps=1300, batch_size=16, learning_rate=3e-3),
        held_out=dict(size=400, seed=10_000, samples=4, max_new_tokens=80),
        rl=dict(prompts_per_step=16, num_generations=8, learning_rate=2e-4, max_steps=30, segment_length=8,
                max_depth=10),  # fmt: skip
        config=dict(tree_packed_training=True),
    ),
    "sums": Setting(
        name="sums",
        description="sums and differences of two one-digit numbers (the earlier demo's setting)",
        task="basic_arithmetic",
        task_config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+", "-"],
                         allow_parentheses=False, allow_negation=False),  # fmt: skip
        model=dict(vocab_size=8192, hidden_size=64, num_layers=2),
        warmup=dict(examples=4000, steps=600, batch_size=16, learning_rate=3e-3),
        # Two one-digit terms make only 200 distinct problems: 50 are held out, the other 150 train.
        held_out=dict(size=50, seed=10_000, samples=8, max_new_tokens=32),
        rl=dict(prompts_per_step=32, num_generations=8, learning_rate=2e-4, max_steps=40, segment_length=4,
                max_depth=8),  # fmt: skip
    ),
}
# `chains` with a warm-up habit to drop. "4 + 1 + 7 = 5 + 7.\nThe final answer is \\boxed{5 + 7}.": the warmed-up model
# sometimes stops before it is done, a habit it can drop on every problem at once, and which only a reward can show
# it is costly. Its arithmetic, by contrast, RL improves only slowly at this size (docs/learning.md). Without the KL
# penalty, the updates' noise undoes the warm model's arithmetic faster than RL teaches it anything (greedy accuracy
# falls 6 to 7 points within 10 steps at lr 2e-4): the penalty holds it.
PRESETS["unfinished"] = PRESETS["chains"].with_overrides(
    name="unfinished",
    description="the chains' sums, with a warm-up in which three answers in ten stop one step before the end",
    warmup=dict(unfinished_share=0.3),
    rl=dict(learning_rate=1e-4, max_steps=40),
    config=dict(beta=0.1),
)
# `unfinished`'s habit on a model whose arithmetic is sturdy, so the habit is what RL has to take. On `unfinished` the
# warm model's greedy answers are right only 25-40% of the time and RL's updates reshuffle which (greedy accuracy fell
# on two seeds in five). Three terms instead of three or four, and twice the warm-up, make greedy answers right about
# 97% of the time while a sample still stops early about three times in ten (docs/learning.md).
PRESETS["habit"] = PRESETS["unfinished"].with_overrides(
    name="habit",
    description="sums of three one-digit numbers, with unfinished's stop-early habit on a sturdier warm model",
    task_config=dict(min_terms=3, max_terms=3),
    warmup=dict(examples=41_600, steps=2600),
)


# ----------------------------------------------------------------------------------------------- the suite


def _beyond_sums(name: str, description: str, task: str, task_config: dict, max_depth: int) -> Setting:
    """A setting of the `beyond` suite: `habit`'s RL run (16 prompts × 8, lr 1e-4, KL penalty 0.1, segments of 8
    tokens), tiny model and warm-up size (`chains`'), with another reasoning-gym task and no unfinished habit
    (that habit is a sums-only construction).

    Two changes to fit the suite's 15 seed-settings into a session on the 2-core machine, both made before any
    TreePO run: one warm model (seed 0's) for every RL seed (a warm-up of these tasks took 7-9 minutes), so a suite
    seed varies the RL run (its prompts, their order, every sample), not the warm model; and 8 prompts a step
    instead of 16 (GRPO's 40 steps of 16 `legs` prompts took 416 s, with evaluations)."""
    # The task configuration replaces habit's whole (a dict section would merge key by key).
    return replace(PRESETS["habit"], task_config=task_config).with_overrides(
        name=name,
        description=description,
        task=task,
        warmup=dict(examples=20_800, steps=1300, batch_size=16, learning_rate=3e-3, unfinished_share=0.0, seed=0),
        held_out=dict(size=200, seed=10_000, samples=4, max_new_tokens=8 * max_depth),
        rl=dict(max_depth=max_depth, prompts_per_step=8),
    )


# Settings TreePO was not developed on (issue 30), from three reasoning-gym families, each with worked answers of
# several intermediate steps (`testing.tasks.WORKED_STEPS`). Fixed on 2026-12-07, before any arm ran on them; the
# depths fit the longest worked answer (measured on 500 problems, 512-token vocabulary: legs 105 tokens, letters 97,
# equations 57). Chosen for: a lookup, products and a sum (legs); a per-word scan and a sum over words (letters); two
# algebra moves on signed numbers (equations).
SUITE_SETTINGS = {
    "legs": _beyond_sums(
        "legs", "legs of two or three kinds of animal, up to three of each: each kind's product, then the sum",
        "leg_counting", dict(min_animals=2, max_animals=3, max_instances=3), max_depth=14,
    ),
    "letters": _beyond_sums(
        "letters", "how often a letter occurs in three or four words: each word's count, then the sum",
        "letter_counting", dict(min_words=3, max_words=4), max_depth=14,
    ),
    "equations": _beyond_sums(
        "equations", "linear equations a*x + b = c with one-digit constants: move the constant, then divide",
        "simple_equations", dict(min_terms=2, max_terms=3, min_value=1, max_value=9), max_depth=8,
    ),
}  # fmt: skip
PRESETS.update(SUITE_SETTINGS)


@dataclass(frozen=True)
class Suite:
    """Settings studied together under one budget, each arm against GRPO over the same paired seeds.

    Attributes:
        settings: preset names.
        arms: the arms of every setting, GRPO among them (it sets the budget).
        seeds: the paired seeds of every setting.
        budget: `"steps"`, `"decoded_tokens"` or `"wall_time"`: every arm runs until it has spent what GRPO spent
            in the setting's `max_steps` on the same seed (`learning.budgets`).
        eval_points: held-out measurements after the start, evenly spaced on the budget axis.
        fixed: the date the suite was fixed, before any of its results.
    """

    settings: tuple
    arms: tuple
    seeds: tuple
    budget: str
    eval_points: int
    fixed: str


SUITES = {
    # Issue 30's suite: TreePO and GRPO first (the verdict), then the finer credit assignments: the released code's
    # per-segment estimator, the per-node values (TreeRL's global + local terms) and Eq. 6's group-size weighting.
    "beyond": Suite(
        settings=("legs", "letters", "equations"),
        arms=("grpo", "treepo", "tree_segment", "node_value", "tree_advantage_group_size"),
        seeds=(0, 1, 2, 3, 4),
        budget="decoded_tokens",
        eval_points=4,
        fixed="2026-12-07",
    ),
}
