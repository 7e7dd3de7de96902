"""`TreePOConfig`: GRPOConfig plus TreePO's tree rollout and advantage knobs (paper arXiv 2508.17445)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trl import GRPOConfig

from .advantages import WEIGHTINGS
from .environments import ENVIRONMENT_BRANCHING
from .sampling import (
    ANSWER_STOP_RULES,
    DIVERGENCE_POLICIES,
    FALLBACK_POLICIES,
    REPETITION_PRIORITIES,
    TreeSamplingParams,
)

ADVANTAGE_ESTIMATORS = ("tree", "tree_segment", "node_value", "grpo")
ADVANTAGE_NORMALIZATIONS = ("batch_whiten", "none")
ROLLOUT_SCHEDULES = ("auto", "per_tree", "level")

# `generation_kwargs` keys that name stop strings: vLLM's `stop`, transformers' `stop_strings`.
STOP_STRING_KEYS = ("stop", "stop_strings")

# Sampling options whose meaning spans a whole completion, which a tree decodes as one request per segment.
_PER_SEGMENT = "the engine would apply it to each segment separately, not to the whole completion."
_PENALTY = "the engine counts penalised tokens over one request's output, which in a tree is one segment."
_BRANCHES = "the tree decides how many branches each request samples."
_LENGTH = "the tree sets each request's length (tree_segment_length)."
PER_COMPLETION_OPTIONS = {
    "frequency_penalty": _PENALTY,
    "presence_penalty": _PENALTY,
    "min_tokens": _PER_SEGMENT,
    "min_new_tokens": _PER_SEGMENT,
    "min_length": _PER_SEGMENT,
    "structured_outputs": "a structured-output constraint would restart with every segment.",
    "guided_decoding": "a guided-decoding constraint would restart with every segment.",
    "n": _BRANCHES,
    "best_of": _BRANCHES,
    "num_return_sequences": _BRANCHES,
    "max_tokens": _LENGTH,
    "max_new_tokens": _LENGTH,
    "num_beams": "beam search would rank each segment's beams on their own, not whole completions, and the tree "
    "already decides how many continuations each path gets.",
    "seed": "a tree samples each branch as its own engine request, and one fixed seed would give the branches of a "
    "path the same continuation.",
}
# Values of those options that change nothing (a single beam is plain sampling).
NEUTRAL_VALUES = {"num_beams": (None, 1), "seed": (None,)}


@dataclass
class TreePOConfig(GRPOConfig):
    r"""
    Configuration class for [`TreePOTrainer`].

    Inherits every parameter of [`~trl.GRPOConfig`]. The tree width w, the number of leaves (trajectories) grown per
    prompt, is `num_generations` (paper: 16). Fields below give the paper's symbol and value; "released code" means
    the official repository (a verl fork), whose defects the spec lists and this package does not reproduce.

    Parameters:
        > Parameters that control the tree rollout (paper §2)

        tree_sampling (`bool`, *optional*, defaults to `True`):
            Grow TreePO segment trees during training. `False` trains exactly as [`~trl.GRPOTrainer`] does with the
            same arguments: `num_generations` independent completions and TRL's own group advantages (the paper's
            sequential GRPO baseline), so that an A/B run is this one flag. The `tree_*` rollout and advantage knobs
            are then unused. Evaluation always samples sequentially, as in the paper.
        tree_segment_length (`int`, *optional*, defaults to `512`):
            l, tokens decoded per tree node (segment). Paper: 512.
        tree_max_depth (`int`, *optional*, defaults to `14`):
            d, maximum segments per trajectory. Paper: 14 (14 × 512 = 7168 response tokens).
        tree_branching_factor (`int`, *optional*, defaults to `2`):
            b, copies made of every continuing path after each segment, until the prompt holds w paths. Paper: 2.
        tree_initial_divergence (`int`, *optional*):
            Paths each prompt starts with. `None` uses b ("Fixed Init Divergence", paper: 2).
        tree_initial_divergence_max (`int`, *optional*):
            When set, each prompt's first fork is drawn uniformly from `[tree_initial_divergence or b,
            tree_initial_divergence_max]` ("More Init Divergence", the paper's best row: 2..8; the released code
            never ran it because of a config bug).
        tree_divergence_policy (`str`, *optional*, defaults to `"fixed_avg"`):
            How a prompt's branching budget is split over its live paths: `"fixed_avg"` (paper: even split),
            `"low_prob"` or `"high_prob"` (paper §4.4 "Low/High Prob Encourage": softmax over each path's
            last-segment mean log-prob).
        tree_divergence_temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of the log-prob divergence policies. Paper §4.4: 2.0.
        tree_fallback_policy (`str`, *optional*, defaults to `"random_cut"`):
            What a prompt does when all its paths stopped before w leaves: `"random_cut"` (paper: re-branch at a
            uniformly random segment boundary of a leaf that ended with an answer or EOS), `"restart"` (re-branch
            from the prompt) or `"none"` (keep fewer leaves; the missing rows are padded and do not train).
        tree_answer_stop (`str`, *optional*, defaults to `"boxed_and_eos"`):
            When a `\boxed{}` answer stops a path: `"boxed_and_eos"` (paper script: answer plus EOS), `"boxed"`
            (as soon as a complete answer appears; the released code's default) or `"none"`. EOS always stops.
        tree_repetition_window (`int`, *optional*, defaults to `32`):
            Characters per window of the repetition stop. Paper code: 32. `0` disables it.
        tree_repetition_min_count (`int`, *optional*, defaults to `8`):
            A window that occurs this many times in one segment stops the path. Paper code: 8.
        tree_repetition_priority (`str`, *optional*, defaults to `"first"`):
            `"first"` checks repetition before answer and EOS (the paper script's intent), `"last"` after the
            length limit (what the released code ran, because the script's key was misspelled).
        tree_reuse_kv_cache (`bool`, *optional*, defaults to `True`):
            transformers backend only: keep each level's KV cache and hand a node's cache to its children instead
            of re-reading their shared prefix. vLLM reuses prefixes through its automatic prefix caching.

        tree_rollout_schedule (`str`, *optional*, defaults to `"auto"`):
            When each tree's next level goes to the engine. `"per_tree"` (vLLM only): each prompt's tree moves to its
            next level as soon as its own level is decoded, while other trees' segments still run (colocate drives
            the engine request by request, and a path's first child continues its parent's engine request; server
            mode sends each tree's levels as concurrent requests). `"level"`: every tree's level waits for the whole
            batch's, a barrier per depth, as in the released code (whose trees a seed does not reproduce here: random
            draws are per prompt). Both give the same trees for the same engine outputs, since every barrier TreePO
            needs is per prompt (paper §2.4–2.5). `"auto"` takes the fastest measured on each backend
            (docs/benchmarks.md): `"per_tree"` on vLLM colocate, `"level"` on vLLM server mode and on transformers,
            whose `generate` cannot add requests to a running batch. Not a paper knob.
        tree_server_max_concurrency (`int`, *optional*, defaults to `32`):
            vLLM server mode with `tree_rollout_schedule="per_tree"`: tree levels in flight at once as concurrent
            HTTP requests, which the server batches together.
        tree_server_request_timeout (`float`, *optional*, defaults to `600.0`):
            vLLM server mode: seconds one tree level's HTTP request may take before it fails with an error naming the
            server (TRL's own client waits forever).
        tree_server_max_retries (`int`, *optional*, defaults to `2`):
            vLLM server mode: retries of a tree level's request after a connection error, timeout or 5xx answer.
        tree_rollout_timeout (`float`, *optional*):
            vLLM server mode with several processes: seconds the other processes wait for the main process to finish
            a whole tree rollout. The wait runs on a dedicated Gloo group, so a long rollout does not trip the NCCL
            watchdog. `None` uses `ddp_timeout`.

        > Parameters that control tool calls in trees (multi-turn rollouts; not in the paper, docs/algorithm.md §8)

        tree_tool_timeout (`float`, *optional*, defaults to `300.0`):
            Seconds one tool call may run before it counts as failed, its result being an error message, as TRL
            reports a tool that raises. TRL has no limit; `None` removes it. A timed-out call keeps running in a
            daemon thread, which Python cannot stop.
        tree_environment_branching (`str`, *optional*, defaults to `"copy"`):
            How a path that branches gets its own `environment_factory` instance, since an environment is stateful
            per path: `"copy"` deep-copies the parent's instance before the path's next tool calls run; `"replay"`
            builds a new instance with the factory, resets it with the example and replays the path's earlier tool
            calls on it (for environments that cannot be copied and are deterministic). Stateless `tools` are run
            once per tree node either way.

        > Parameters that control the advantages (paper §3.3)

        tree_advantage_estimator (`str`, *optional*, defaults to `"tree"`):
            `"tree"`: the paper's global + local subgroup advantage (Eq. 5–7), one value per leaf. `"grpo"`: TRL's
            own group advantage (the paper's "GRPO w/ tree sampling" ablation). `"tree_segment"`: the released
            code's segment-level estimator (`tree_rfpp_progress`, not the paper's method): one value per segment,
            node value minus discounted parent value, passed to the loss as a [B, T] tensor. `"node_value"`: not in
            the paper; per-node values as in TreeRL (Hou et al. 2025), one value per segment, [B, T]: segment i gets
            `(V(n_i) − V(prompt)) + (V(n_i) − V(n_{i−1}))`, V(n) the mean reward of the leaves below node n
            (`advantages.compute_node_value_advantages`).
        tree_advantage_weighting (`str`, *optional*, defaults to `"average"`):
            How the `"tree"` estimator combines subgroup terms: `"average"` (Eq. 5, the paper's choice) or
            `"group_size"` (Eq. 6, the released code's default). The segment estimators have weightings of their
            own (`"tree_segment"` always weights by group size, as the released code does) and refuse
            `"group_size"`.
        tree_reject_zero_std_subgroups (`bool`, *optional*, defaults to `False`):
            `"tree"` estimator: leave out subtrees whose rewards are all equal (Eq. 7, "subgroup rejection"; the
            paper finds it hurts).
        tree_advantage_normalization (`str`, *optional*, defaults to `"batch_whiten"`):
            `"batch_whiten"`: subtract the mean and divide by the std over every valid token of the whole batch
            (the paper's "global variance normalization as in REINFORCE++"). `"none"`: raw tree advantages. The
            tree estimators' counterpart of GRPO's `scale_rewards`, which only the `"grpo"` estimator reads.
        tree_segment_advantage_discount (`float`, *optional*, defaults to `1.0`):
            η of the `"tree_segment"` estimator: segment i of a leaf with J segments gets
            `V(node_i) − η^(J+1−i) V(node_{i−1})` (released code: `segtree_adv_eta`, off by default). 1 = no discount.
        tree_filter_zero_std_prompts (`bool`, *optional*, defaults to `True`):
            Dynamic sampling (paper §3.1, from DAPO): leaves of a prompt whose rewards are all equal do not train
            (their loss mask is zeroed), and they are left out of the batch normalisation, which would otherwise
            give them non-zero advantages. The paper also refills the batch with new prompts; a TRL batch has a
            fixed size, so filtered prompts are not replaced.

        > Parameters that control training (beyond the paper)

        tree_packed_training (`bool`, *optional*):
            Forward and back-propagate each shared prefix once: the rows that share a prompt are packed into a token
            trie with tree attention (memory linear in its tokens), each leaf's log-probabilities are gathered back
            out, and the generation batch is cut into micro-batches of whole trees. The loss and gradients equal the
            unpacked ones. Not in the paper (whose code recomputes shared prefixes per leaf). `None` (the default)
            turns it on with tree rollouts and off with `tree_sampling=False`, so that a GRPO run computes exactly
            what `GRPOTrainer` does unless packing is asked for (`True` then shares each prompt's forward among its
            rows). Packing only runs where it is exact: full causal attention with rotary positions, through `sdpa`
            (or flash/flex) attention.
            Sliding windows, Mamba/convolution/linear-attention layers, absolute positions, attention sinks,
            `eager` attention, multimodal inputs and the MoE auxiliary loss fall back to the unpacked forward with a
            one-time warning naming the reason, as does a model whose first packed batch fails a self-check
            against the unpacked forward.
        tree_packed_max_tokens (`int`, *optional*, defaults to `32768`):
            Token budget of one packed sequence: a micro-batch's tries are placed in sequences of at most this many
            tokens, each its own forward, and a trie larger than the budget is split by leaves. Bounds the
            per-forward memory that grows with sequence length. `None`: one sequence per micro-batch.

        > Parameters from GRPOConfig whose default follows the paper

        max_completion_length (`int`, *optional*):
            Must equal `tree_segment_length × tree_max_depth` (paper: 7168); `None` derives it. Segment
            boundaries then fall at multiples of l, and the depth limit is the length limit.
        epsilon_high (`float`, *optional*, defaults to `0.28`):
            Upper clipping bound of the ratio (DAPO clip-higher; paper: ε_low = 0.2, ε_high = 0.28).
        delta (`float`, *optional*, defaults to `10.0`):
            Cap on the ratio for negative advantages (paper: dual-clip c = 10).
    """

    # --- the tree rollout -----------------------------------------------------------------------------------------
    tree_sampling: bool = field(
        default=True,
        metadata={
            "help": "Grow TreePO segment trees during training. False trains exactly as GRPOTrainer with the same "
            "arguments (independent samples, TRL's advantages): the A/B baseline in one flag."
        },
    )
    tree_segment_length: int = field(
        default=512,
        metadata={"help": "l: tokens decoded per tree node (segment). Paper: 512."},
    )
    tree_max_depth: int = field(
        default=14,
        metadata={"help": "d: maximum segments per trajectory. Paper: 14 (14 x 512 = 7168 tokens)."},
    )
    tree_branching_factor: int = field(
        default=2,
        metadata={"help": "b: copies of every continuing path after each segment, until w paths. Paper: 2."},
    )
    tree_initial_divergence: int | None = field(
        default=None,
        metadata={"help": "Paths each prompt starts with. None uses b ('Fixed Init Divergence', paper: 2)."},
    )
    tree_initial_divergence_max: int | None = field(
        default=None,
        metadata={
            "help": "If set, the first fork is drawn per prompt from [tree_initial_divergence or b, this] ('More "
            "Init Divergence', the paper's best row: 2..8)."
        },
    )
    tree_divergence_policy: str = field(
        default="fixed_avg",
        metadata={
            "help": "Split of the branching budget over live paths: 'fixed_avg' (paper), 'low_prob' or 'high_prob' "
            "(paper 4.4: softmax over last-segment mean log-prob).",
            "choices": list(DIVERGENCE_POLICIES),
        },
    )
    tree_divergence_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature of the log-prob divergence policies. Paper 4.4: 2.0."},
    )
    tree_fallback_policy: str = field(
        default="random_cut",
        metadata={
            "help": "When all paths of a prompt stopped before w leaves: 'random_cut' (paper: re-branch at a random "
            "segment boundary of a leaf that ended with an answer or EOS), 'restart' (from the prompt) or 'none'.",
            "choices": list(FALLBACK_POLICIES),
        },
    )
    tree_answer_stop: str = field(
        default="boxed_and_eos",
        metadata={
            "help": "When a \\boxed{} answer stops a path: 'boxed_and_eos' (paper script), 'boxed' (as soon as a "
            "complete answer appears) or 'none'. EOS always stops a path.",
            "choices": list(ANSWER_STOP_RULES),
        },
    )
    tree_repetition_window: int = field(
        default=32,
        metadata={"help": "Characters per repetition window. Paper code: 32. 0 disables the repetition stop."},
    )
    tree_repetition_min_count: int = field(
        default=8,
        metadata={"help": "A window seen this many times in one segment stops the path. Paper code: 8."},
    )
    tree_repetition_priority: str = field(
        default="first",
        metadata={
            "help": "'first': check repetition before answer and EOS (paper script's intent); 'last': after the "
            "length limit (what the released code ran).",
            "choices": list(REPETITION_PRIORITIES),
        },
    )
    tree_reuse_kv_cache: bool = field(
        default=True,
        metadata={
            "help": "transformers backend: hand each node's KV cache to its children instead of re-reading the "
            "shared prefix."
        },
    )

    tree_rollout_schedule: str = field(
        default="auto",
        metadata={
            "help": "When each tree's next level goes to the engine: 'per_tree' (as soon as its own level is decoded; "
            "vLLM only), 'level' (a barrier per depth across the batch) or 'auto' (per_tree on vLLM colocate, level "
            "on vLLM server mode and transformers).",
            "choices": list(ROLLOUT_SCHEDULES),
        },
    )
    tree_server_max_concurrency: int = field(
        default=32,
        metadata={"help": "vLLM server mode, per_tree schedule: tree levels in flight at once as concurrent requests."},
    )
    tree_server_request_timeout: float = field(
        default=600.0,
        metadata={"help": "vLLM server mode: seconds a tree level's HTTP request may take before it fails."},
    )
    tree_server_max_retries: int = field(
        default=2,
        metadata={"help": "vLLM server mode: retries of a tree level's request after a connection error or 5xx."},
    )
    tree_rollout_timeout: float | None = field(
        default=None,
        metadata={
            "help": "vLLM server mode, several processes: seconds to wait for the main process's rollout, on a "
            "dedicated Gloo group. None uses ddp_timeout."
        },
    )

    # --- tool calls in trees --------------------------------------------------------------------------------------
    tree_tool_timeout: float | None = field(
        default=300.0,
        metadata={
            "help": "Seconds one tool call may run before it fails with an error result (TRL has no limit). None: "
            "no limit."
        },
    )
    tree_environment_branching: str = field(
        default="copy",
        metadata={
            "help": "How a branching path gets its own environment instance: 'copy' (copy.deepcopy of the parent's) "
            "or 'replay' (a new instance from environment_factory, reset and replayed with the path's tool calls).",
            "choices": list(ENVIRONMENT_BRANCHING),
        },
    )

    # --- the advantages -------------------------------------------------------------------------------------------
    tree_advantage_estimator: str = field(
        default="tree",
        metadata={
            "help": "'tree': the paper's subgroup advantage (Eq. 5-7); 'grpo': TRL's group advantage (the paper's "
            "'GRPO w/ tree sampling' ablation); 'tree_segment': the released code's per-segment node-minus-parent "
            "values ([B, T]); 'node_value': per-segment (V(n_i) - V(prompt)) + (V(n_i) - V(parent)), V the mean "
            "reward of the leaves below a node (TreeRL's process signal; not in the paper) ([B, T]).",
            "choices": list(ADVANTAGE_ESTIMATORS),
        },
    )
    tree_advantage_weighting: str = field(
        default="average",
        metadata={
            "help": "How the 'tree' estimator combines subgroup terms: 'average' (Eq. 5, paper) or 'group_size' (Eq. 6).",
            "choices": list(WEIGHTINGS),
        },
    )
    tree_reject_zero_std_subgroups: bool = field(
        default=False,
        metadata={"help": "'tree' estimator: leave out subtrees whose rewards are all equal (Eq. 7)."},
    )
    tree_advantage_normalization: str = field(
        default="batch_whiten",
        metadata={
            "help": "'batch_whiten': token-weighted mean/std over the whole batch (paper, REINFORCE++ style); "
            "'none'. The tree estimators' counterpart of scale_rewards, which only the 'grpo' estimator reads.",
            "choices": list(ADVANTAGE_NORMALIZATIONS),
        },
    )
    tree_segment_advantage_discount: float = field(
        default=1.0,
        metadata={
            "help": "eta of the 'tree_segment' estimator: segment i of J gets V(node_i) - eta^(J+1-i) V(parent). "
            "1 = no discount."
        },
    )
    tree_filter_zero_std_prompts: bool = field(
        default=True,
        metadata={
            "help": "Dynamic sampling (paper 3.1): leaves of prompts whose rewards are all equal do not train and "
            "stay out of the batch normalisation."
        },
    )

    # --- training, beyond the paper --------------------------------------------------------------------------------
    tree_packed_training: bool | None = field(
        default=None,
        metadata={
            "help": "Beyond the paper: forward and back-propagate each shared prefix once, with tree attention and "
            "micro-batches of whole trees (exact; models where it cannot be exact fall back, with a warning). None: "
            "on with tree rollouts, off with tree_sampling=False."
        },
    )
    tree_packed_max_tokens: int | None = field(
        default=32768,
        metadata={
            "help": "Token budget of one packed sequence (one forward); larger tries are split by leaves. None: one "
            "sequence per micro-batch."
        },
    )

    # --- GRPOConfig fields whose default follows the paper --------------------------------------------------------
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Must equal tree_segment_length x tree_max_depth (paper: 7168); None derives it."},
    )
    epsilon_high: float | None = field(
        default=0.28,
        metadata={"help": "Upper ratio clipping bound (DAPO clip-higher; paper: 0.28 with epsilon 0.2)."},
    )
    delta: float | None = field(
        default=10.0,
        metadata={"help": "Ratio cap for negative advantages (paper: dual-clip c = 10)."},
    )

    def __post_init__(self):
        self._check_tree_shape()
        self._check_tree_knobs()
        super().__post_init__()
        self._check_with_grpo_settings()
        self._resolve_defaults()

    def _resolve_defaults(self) -> None:
        """The defaults that depend on other settings, made concrete: the fastest exact path for this run."""
        if self.tree_packed_training is None:
            self.tree_packed_training = self.tree_sampling
        if self.tree_rollout_schedule == "auto":
            colocated = self.use_vllm and self.vllm_mode == "colocate"
            self.tree_rollout_schedule = "per_tree" if colocated else "level"

    def _check_tree_shape(self) -> None:
        """l, d and b, and the completion budget they imply (derived when unset)."""
        for name in ("tree_segment_length", "tree_max_depth", "tree_branching_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        budget = self.tree_segment_length * self.tree_max_depth
        if self.max_completion_length is None:
            self.max_completion_length = budget
        elif self.max_completion_length != budget and self.tree_sampling:
            raise ValueError(
                f"max_completion_length ({self.max_completion_length}) must equal tree_segment_length × "
                f"tree_max_depth ({self.tree_segment_length} × {self.tree_max_depth} = {budget}): a TreePO "
                "trajectory is at most d segments of l tokens. Leave max_completion_length unset (None) to derive "
                f"it, or pick tree_max_depth/tree_segment_length whose product is {self.max_completion_length}."
            )

    def _check_tree_knobs(self) -> None:
        """Every other `tree_*` knob, each with an error that names the field and the fix."""
        for name, choices in (
            ("tree_divergence_policy", DIVERGENCE_POLICIES),
            ("tree_fallback_policy", FALLBACK_POLICIES),
            ("tree_answer_stop", ANSWER_STOP_RULES),
            ("tree_repetition_priority", REPETITION_PRIORITIES),
            ("tree_advantage_estimator", ADVANTAGE_ESTIMATORS),
            ("tree_advantage_weighting", WEIGHTINGS),
            ("tree_advantage_normalization", ADVANTAGE_NORMALIZATIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"Unknown {name} {getattr(self, name)!r}. Choose one of: {', '.join(choices)}."
                )
        if self.tree_initial_divergence is not None and self.tree_initial_divergence < 1:
            raise ValueError(f"tree_initial_divergence must be >= 1, got {self.tree_initial_divergence}.")
        low = self.tree_initial_divergence or self.tree_branching_factor
        if self.tree_initial_divergence_max is not None and self.tree_initial_divergence_max < low:
            raise ValueError(
                f"tree_initial_divergence_max ({self.tree_initial_divergence_max}) must be >= the lower end of the "
                f"range, tree_initial_divergence or tree_branching_factor ({low})."
            )
        if self.tree_divergence_temperature <= 0:
            raise ValueError(f"tree_divergence_temperature must be positive, got {self.tree_divergence_temperature}.")
        if self.tree_repetition_window < 0 or self.tree_repetition_min_count < 0:
            raise ValueError(
                "tree_repetition_window and tree_repetition_min_count must be >= 0 (0 disables the repetition stop)."
            )
        if self.tree_segment_advantage_discount <= 0:
            raise ValueError(
                f"tree_segment_advantage_discount must be positive (1 = no discount), got "
                f"{self.tree_segment_advantage_discount}."
            )
        if self.tree_advantage_estimator in ("tree_segment", "node_value") and (
            self.tree_reject_zero_std_subgroups or self.tree_advantage_weighting != "average"
        ):
            raise ValueError(
                "tree_reject_zero_std_subgroups and tree_advantage_weighting apply to the 'tree' estimator; the "
                f"{self.tree_advantage_estimator!r} estimator has its own weighting and keeps every subgroup. Leave "
                "them at their defaults, or use tree_advantage_estimator='tree'."
            )
        if self.tree_server_request_timeout <= 0 or self.tree_server_max_retries < 0:
            raise ValueError(
                "tree_server_request_timeout must be positive and tree_server_max_retries >= 0, got "
                f"{self.tree_server_request_timeout} and {self.tree_server_max_retries}."
            )
        if self.tree_packed_training not in (None, True, False):
            raise ValueError(
                f"tree_packed_training must be True, False or None (on with tree rollouts, off with "
                f"tree_sampling=False), got {self.tree_packed_training!r}."
            )
        if self.tree_packed_max_tokens is not None and self.tree_packed_max_tokens < 1:
            raise ValueError(f"tree_packed_max_tokens must be a positive token count or None, got {self.tree_packed_max_tokens}.")
        if self.tree_rollout_schedule not in ROLLOUT_SCHEDULES:
            raise ValueError(
                f"Unknown tree_rollout_schedule {self.tree_rollout_schedule!r}. Choose one of: "
                f"{', '.join(ROLLOUT_SCHEDULES)}."
            )
        if self.tree_sampling and self.tree_rollout_schedule == "per_tree" and not self.use_vllm:
            raise ValueError(
                "tree_rollout_schedule='per_tree' needs vLLM (use_vllm=True): transformers' `generate` cannot add a "
                "tree's next level to a running batch, so the transformers backend decodes level by level. Use "
                "tree_rollout_schedule='level', or set use_vllm=True."
            )
        if self.tree_server_max_concurrency < 1:
            raise ValueError(
                f"tree_server_max_concurrency must be at least 1, got {self.tree_server_max_concurrency}."
            )
        if self.tree_rollout_timeout is not None and self.tree_rollout_timeout <= 0:
            raise ValueError(f"tree_rollout_timeout must be positive seconds, got {self.tree_rollout_timeout}.")
        if self.tree_tool_timeout is not None and self.tree_tool_timeout <= 0:
            raise ValueError(
                f"tree_tool_timeout must be positive seconds or None (no limit), got {self.tree_tool_timeout}."
            )
        if self.tree_environment_branching not in ENVIRONMENT_BRANCHING:
            raise ValueError(
                f"Unknown tree_environment_branching {self.tree_environment_branching!r}. Choose one of: "
                f"{', '.join(ENVIRONMENT_BRANCHING)}."
            )

    def _check_with_grpo_settings(self) -> None:
        """Tree settings against GRPOConfig's, once GRPOConfig has resolved its own: `generation_kwargs` given as a JSON
        string (CLI, YAML) parsed, `use_transformers_paged` turned into continuous batching, `steps_per_generation`."""
        if self.tree_sampling:
            self._check_generation_kwargs()
        if self.tree_sampling and self.use_transformers_continuous_batching:
            raise ValueError(
                "use_transformers_continuous_batching (or the deprecated use_transformers_paged) is not used by tree "
                "rollouts, which drive `generate` level by level. Unset it, or set tree_sampling=False."
            )
        uses_tree_estimator = self.tree_sampling and self.tree_advantage_estimator != "grpo"
        if uses_tree_estimator and self.scale_rewards != "group":
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} is GRPO's normalisation, which the tree estimators do not use: "
                "they normalise with tree_advantage_normalization ('batch_whiten', the paper's, or 'none'). Leave "
                "scale_rewards at its default, or set tree_advantage_estimator='grpo' to train with GRPO's advantages."
            )

        if self.tree_sampling and not (self.use_vllm and self.vllm_mode == "server"):
            rows = self.per_device_train_batch_size * self.steps_per_generation
            if rows % self.num_generations:
                raise ValueError(
                    f"Each process grows whole trees, so its rows per generation (per_device_train_batch_size × "
                    f"steps_per_generation = {self.per_device_train_batch_size} × {self.steps_per_generation} = "
                    f"{rows}) must be a multiple of num_generations ({self.num_generations}). Adjust "
                    "per_device_train_batch_size or gradient_accumulation_steps/steps_per_generation, or use "
                    "vllm_mode='server', which grows every tree on the main process."
                )

    def _check_generation_kwargs(self) -> None:
        """Refuse sampling options that a tree would apply per segment instead of per completion (not as GRPO does)."""
        if self.vllm_structured_outputs_regex is not None:
            raise ValueError(
                "vllm_structured_outputs_regex constrains a whole completion, but a tree decodes it in segments that "
                "each restart the constraint. Unset it, or set tree_sampling=False."
            )
        for name, value in (self.generation_kwargs or {}).items():
            if name in PER_COMPLETION_OPTIONS and value not in NEUTRAL_VALUES.get(name, (None, 0, 0.0, False)):
                raise ValueError(
                    f"generation_kwargs[{name!r}]={value!r} cannot be honoured in a tree rollout: "
                    f"{PER_COMPLETION_OPTIONS[name]} Remove it, or set tree_sampling=False to sample sequentially."
                )
        for stop in self.tree_stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"Stop strings in generation_kwargs must be non-empty strings, got {stop!r}.")

    @property
    def tree_stop_strings(self) -> tuple[str, ...]:
        """The user's stop strings (`generation_kwargs` `stop` for vLLM, `stop_strings` for transformers).

        The tree sampler applies them itself, across segment boundaries, on every backend.
        """
        stops = []
        for key in STOP_STRING_KEYS:
            value = (self.generation_kwargs or {}).get(key)
            stops += [value] if isinstance(value, str) else list(value or [])
        return tuple(dict.fromkeys(stops))

    def tree_sampling_params(self, eos_token_ids, seed: int) -> TreeSamplingParams:
        """The rollout knobs as the plain object that the sampler reads."""
        return TreeSamplingParams(
            width=self.num_generations,
            segment_length=self.tree_segment_length,
            max_depth=self.tree_max_depth,
            branching_factor=self.tree_branching_factor,
            max_response_length=self.max_completion_length,
            initial_divergence=self.tree_initial_divergence,
            initial_divergence_max=self.tree_initial_divergence_max,
            divergence_policy=self.tree_divergence_policy,
            divergence_temperature=self.tree_divergence_temperature,
            fallback_policy=self.tree_fallback_policy,
            answer_stop=self.tree_answer_stop,
            repetition_window=self.tree_repetition_window,
            repetition_min_count=self.tree_repetition_min_count,
            repetition_priority=self.tree_repetition_priority,
            eos_token_ids=tuple(eos_token_ids),
            stop_strings=self.tree_stop_strings,
            seed=seed,
            max_tool_turns=self.max_tool_calling_iterations,
        )


@dataclass(frozen=True)
class GRPODifference:
    """One way a TreePO run trains differently from `GRPOTrainer` with the same arguments (tree_sampling=True)."""

    what: str
    grpo: str
    treepo: str
    why: str
    applies: Callable[[TreePOConfig], bool] = lambda args: True


# docs/configuration.md's table of differences is generated from this list, and the trainer logs the ones in effect.
GRPO_DIFFERENCES = (
    GRPODifference(
        "`max_completion_length`", "512; any value", "`tree_segment_length × tree_max_depth` (paper: 7168); other "
        "values raise", "A trajectory is at most d segments of l tokens, with segment boundaries at multiples of l "
        "(with tools, a segment also ends at a tool call, and tool results count towards the limit, as in TRL).",
    ),
    GRPODifference(
        "`epsilon_high`", "`None` (= `epsilon`)", "0.28", "The paper's DAPO clip-higher (ε_low 0.2, ε_high 0.28).",
        lambda args: args.epsilon_high == 0.28,
    ),
    GRPODifference(
        "`delta`", "`None` (no cap)", "10.0", "The paper's dual-clip c = 10 for negative advantages.",
        lambda args: args.delta == 10.0,
    ),
    GRPODifference(
        "Completions", "`num_generations` independent samples", "the `num_generations` leaves of a segment tree",
        "TreePO's rollout (paper §2).",
    ),
    GRPODifference(
        "Advantages", "group z-score (`scale_rewards`)", "tree subgroup estimate (paper Eq. 5), whitened over the "
        "batch's tokens", "Paper §3.3. `tree_advantage_estimator='grpo'` keeps GRPO's; with the tree estimators "
        "`scale_rewards` must stay `'group'` (they normalise with `tree_advantage_normalization`).",
        lambda args: args.tree_advantage_estimator != "grpo",
    ),
    GRPODifference(
        "Prompts whose rewards are all equal", "advantage 0; their tokens count in the loss normaliser",
        "masked out of the loss; with the token-normalised losses (`dapo`, the default, `bnpo`, `cispo`, `vespo`) also "
        "out of its normaliser, while `grpo`, `sapo`, `luspo` (a mean over rows) and `dr_grpo` (a fixed normaliser) "
        "still count them as rows of zero loss", "DAPO's dynamic sampling (paper §3.1), "
        "`tree_filter_zero_std_prompts`. Filtered prompts are not replaced, since a TRL batch has a fixed size.",
        lambda args: args.tree_filter_zero_std_prompts,
    ),
    GRPODifference(
        "Truncation (`mask_truncated_completions`, `completions/clipped_ratio`)", "the last token is not EOS or pad",
        "the length limit stopped the leaf", "A leaf stopped by an answer, repetition or a stop string is finished, "
        "though it ends without EOS.",
    ),
    GRPODifference(
        "`multi_objective_aggregation='normalize_then_sum'`", "z-score each function over the group, sum, z-score the "
        "sum over the batch", "z-score each function over the prompt's leaves, sum, then the tree estimator",
        "The tree estimator and its normalisation take the place of the final batch z-score.",
        lambda args: args.multi_objective_aggregation == "normalize_then_sum",
    ),
    GRPODifference(
        "Stop strings (`generation_kwargs` `stop` or `stop_strings`)", "applied by vLLM (`stop`)",
        "applied by the tree sampler on every backend, across segment boundaries",
        "Segments are separate engine requests; a stop string may span two of them.",
        lambda args: bool(args.tree_stop_strings),
    ),
    GRPODifference(
        "`frequency_penalty`, `presence_penalty`, `min_tokens`, `min_new_tokens`, structured outputs", "per completion",
        "refused with an error", "The engine would apply them to each segment request, not to the completion.",
        lambda args: False,
    ),
    GRPODifference(
        "`tools`, `environment_factory`", "every completion runs its own tool calls; `tools/call_frequency` = calls "
        "per completion", "a turn's calls run once per tree node and the leaves below share the result; each path "
        "owns a copy of its environment (`tree_environment_branching`); a call may time out (`tree_tool_timeout`); "
        "`tools/call_frequency` = calls run per completion (`tree/sequential_tool_calls` counts them per leaf)",
        "Agentic trees (docs/algorithm.md §8): the tool call and its result are the prefix the leaves share.",
        lambda args: False,
    ),
    GRPODifference(
        "`rollout_func`, images", "supported", "refused with an error",
        "They replace the tree rollout or need the vision path. `tree_sampling=False` trains them as GRPO does.",
        lambda args: False,
    ),
)


def grpo_differences_reference() -> str:
    """The markdown table of `GRPO_DIFFERENCES`, for docs/configuration.md."""
    lines = ["| What | `GRPOTrainer` | `TreePOTrainer` | Why |", "|---|---|---|---|"]
    lines += [f"| {d.what} | {d.grpo} | {d.treepo} | {d.why} |" for d in GRPO_DIFFERENCES]
    return "\n".join(lines)


def grpo_differences_message(args: TreePOConfig) -> str:
    """What the trainer logs once at start-up: how this run trains differently from GRPOTrainer."""
    if not args.tree_sampling:
        message = (
            "tree_sampling=False: TreePOTrainer samples and computes advantages exactly as GRPOTrainer does with these "
            "arguments; the tree rollout and advantage settings are unused."
        )
        if args.tree_packed_training:
            message += (
                " tree_packed_training still acts: each prompt's rows share one forward of their prompt (exact, up to "
                "floating-point rounding). Set it to False to run GRPOTrainer's forward bit for bit."
            )
        return message
    lines = [f"- {d.what}: {d.treepo} (GRPOTrainer: {d.grpo})" for d in GRPO_DIFFERENCES if d.applies(args)]
    return "TreePOTrainer trains differently from GRPOTrainer with these arguments (docs/configuration.md):\n" + (
        "\n".join(lines)
    )


# Fields TreePOConfig adds, or whose default it changes to the paper's, in declaration order.
def treepo_fields() -> list:
    """The `TreePOConfig` fields that TreePO adds or whose default follows the paper, in declaration order."""
    from dataclasses import fields

    inherited = {f.name: f for f in fields(GRPOConfig)}
    return [f for f in fields(TreePOConfig) if f.name not in inherited or f.default != inherited[f.name].default]


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def configuration_reference() -> str:
    """The markdown table of `docs/configuration.md`, generated from `TreePOConfig` so the doc cannot drift."""
    lines = ["| Field | Default | Choices | Description |", "|---|---|---|---|"]
    for f in treepo_fields():
        choices = ", ".join(f"`{c}`" for c in f.metadata.get("choices", [])) or "—"
        lines.append(f"| `{f.name}` | `{f.default!r}` | {choices} | {_markdown_cell(f.metadata['help'])} |")
    return "\n".join(lines)


def configuration_card(args: TreePOConfig) -> str:
    """A model-card section with the run's TreePO settings (`TreePOTrainer.create_model_card`)."""
    lines = ["| Setting | Value |", "|---|---|", f"| `num_generations` (tree width w) | `{args.num_generations}` |"]
    for f in treepo_fields():
        lines.append(f"| `{f.name}` | `{_markdown_cell(repr(getattr(args, f.name)))}` |")
    for name in ("loss_type", "epsilon", "beta", "learning_rate", "temperature"):
        lines.append(f"| `{name}` | `{_markdown_cell(repr(getattr(args, name)))}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(configuration_reference())
    print()
    print(grpo_differences_reference())
