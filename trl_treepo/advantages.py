"""TreePO's tree-based advantages (paper §3.3, Eq. 5–7; spec §6), free of TRL and torch.distributed.

A leaf i with segments s_1 ⊕ … ⊕ s_J belongs to nested groups G ⊇ G_1 ⊇ G_2 ⊇ …: the root group G (all leaves of
its prompt) and, for each proper ancestor node, the leaves below it. Its advantage averages the group-relative
rewards over those groups:

    Eq. 5 ("average", the paper's choice):        A_i = mean_j ( R_i − mean_{k∈G_j} R_k )
    Eq. 6 ("group_size"):                         A_i = Σ_j |G_j| (R_i − mean_{G_j} R) / Σ_j |G_j|
    Eq. 7 (subgroup rejection):                   Eq. 5/6 without the groups whose rewards are all equal

The root group always counts; an ancestor subtree counts only when it holds at least two scored leaves (a lone
chain has no siblings to compare with), and the leaf itself is never a group. The result is then normalised by
`whiten`, the paper's "global variance normalization as in REINFORCE++": one token-weighted mean and unbiased std
over every valid token of the batch.

Rewards may be NaN for leaves that no reward function scored (TRL's `None`): those leaves are left out of every
group statistic and their advantage is NaN, which `whiten` turns into 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

WEIGHTINGS = ("average", "group_size")

Path = Sequence[Hashable]


def _group_statistics(rewards: list[float], paths: Sequence[Path]) -> dict[tuple, list[float]]:
    """Scored rewards of every group, keyed by the path prefix that defines it (length 1 = the root group)."""
    members: dict[tuple, list[float]] = defaultdict(list)
    for reward, path in zip(rewards, paths):
        if reward != reward:  # NaN: unscored
            continue
        for depth in range(1, len(path)):
            members[tuple(path[:depth])].append(reward)
    return members


def _group_means(rewards: torch.Tensor, paths: Sequence[Path]) -> tuple[list[float], dict, dict]:
    """The rewards as floats, the scored members of every group, and every group's mean."""
    values = rewards.detach().double().cpu().tolist()
    groups = _group_statistics(values, paths)
    return values, groups, {key: sum(members) / len(members) for key, members in groups.items()}


def _check_inputs(rewards: torch.Tensor, paths: Sequence[Path], weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}. Choose one of: {', '.join(WEIGHTINGS)}.")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor with one entry per leaf, got shape {tuple(rewards.shape)}.")
    if len(paths) != rewards.numel():
        raise ValueError(f"Got {rewards.numel()} rewards but {len(paths)} paths; pass one path per leaf.")
    for path in paths:
        if len(path) < 2:
            raise ValueError(
                f"Each path must hold the prompt id and at least one node id (the leaf's last segment); got {path!r}."
            )


def compute_tree_advantages(
    rewards: torch.Tensor,
    paths: Sequence[Path],
    *,
    weighting: str = "average",
    reject_zero_std_subgroups: bool = False,
) -> torch.Tensor:
    """Per-leaf tree advantages before normalisation (paper Eq. 5, or Eq. 6/7 with the options).

    Args:
        rewards: 1-D float tensor, one reward per leaf; NaN marks an unscored leaf.
        paths: one tuple per leaf: the prompt id, then the node ids of depths 1..d (the last is the leaf's own
            last segment). Leaves share an ancestor at depth j exactly when their paths share the first j + 1 items.
        weighting: `"average"` (Eq. 5, the paper's choice) or `"group_size"` (Eq. 6, the released code's default).
        reject_zero_std_subgroups: drop depth ≥ 1 groups whose rewards are all equal (Eq. 7). The root group is
            never dropped.

    Returns:
        A 1-D float tensor like `rewards`; NaN where the reward is NaN.
    """
    _check_inputs(rewards, paths, weighting)
    values, groups, means = _group_means(rewards, paths)
    advantages = []
    for reward, path in zip(values, paths):
        if reward != reward:
            advantages.append(float("nan"))
            continue
        weighted_sum = total_weight = 0.0
        for depth in range(1, len(path)):
            key = tuple(path[:depth])
            members = groups[key]
            if depth > 1:
                if len(members) < 2:
                    continue
                if reject_zero_std_subgroups and max(members) == min(members):
                    continue
            weight = float(len(members)) if weighting == "group_size" else 1.0
            weighted_sum += weight * (reward - means[key])
            total_weight += weight
        advantages.append(weighted_sum / total_weight)
    return torch.tensor(advantages, dtype=rewards.dtype, device=rewards.device)


def released_leaf_values(rewards: torch.Tensor, paths: Sequence[Path]) -> torch.Tensor:
    """Each leaf's tree-relative reward as the released segment estimator computes it (its `tree_group_wise_reward`).

    ``v_i = Σ_p |p| (R_i − mean_p R) / Σ_p |p|`` over every prefix group p of the leaf's path: the root group, every
    ancestor node and the leaf itself, singletons included (a singleton adds a 0 term of weight 1). Unlike
    `compute_tree_advantages`, nothing is skipped and the weights are always the group sizes. NaN rewards join no
    group and give NaN.
    """
    _check_inputs(rewards, paths, "group_size")
    values, groups, means = _group_means(rewards, [(*path, None) for path in paths])  # `None`: the leaf's own group
    leaf_values = []
    for reward, path in zip(values, paths):
        if reward != reward:
            leaf_values.append(float("nan"))
            continue
        prefixes = [tuple(path[:depth]) for depth in range(1, len(path) + 1)]
        sizes = [len(groups[prefix]) for prefix in prefixes]
        terms = [size * (reward - means[prefix]) for size, prefix in zip(sizes, prefixes)]
        leaf_values.append(sum(terms) / sum(sizes))
    return torch.tensor(leaf_values, dtype=torch.float64)


def compute_segment_advantages(
    rewards: torch.Tensor,
    paths: Sequence[Path],
    lengths: Sequence[int],
    segment_length: int,
    *,
    discount: float = 1.0,
    segment_ends: Sequence[Sequence[int] | None] | None = None,
) -> torch.Tensor:
    """Per-token advantages [B, max(lengths)], one value per segment: the released code's segment estimator.

    Not the paper's method (spec §6.4); the released code's `compute_tree_rfpp_progress_outcome_advantage`:

    1. each leaf's value is its tree-relative reward (`released_leaf_values`);
    2. an internal node's value is the mean of its children's values (each child once, leaf or node), bottom-up;
       the prompt (root) has value 0;
    3. segment i (1-based) of a leaf with J segments gets ``V(node_i) − η^(J + 1 − i) · V(node_{i−1})``: the parent
       term is discounted more the further the segment lies from the leaf (η on the last segment, η^J on the first);
       η = `discount`, 1 for no discount (the released default);
    4. each value is broadcast over its segment's tokens; tokens past a leaf's length are 0.

    Segment i of a row spans ``[(i-1)·l, i·l)``, or, where `segment_ends` gives the row's end offsets (segments cut
    short by a tool call), ``[ends[i-2], ends[i-1])``.

    NaN leaves are left out of node means and get NaN advantages. Whiten the result with `whiten` and a token mask.
    """
    if discount <= 0:
        raise ValueError(f"discount must be positive (1 = no discount), got {discount}.")
    leaf_values = released_leaf_values(rewards, paths).tolist()

    children: dict[tuple, set[tuple]] = defaultdict(set)
    node_value: dict[tuple, float] = {}
    for value, path in zip(leaf_values, paths):
        node_value[tuple(path)] = value
        for depth in range(1, len(path)):
            children[tuple(path[:depth])].add(tuple(path[: depth + 1]))
    for path in paths:
        node_value[tuple(path[:1])] = 0.0  # the prompt

    def value_of(node: tuple) -> float:
        if node not in node_value:
            scored = [v for v in (value_of(child) for child in sorted(children[node], key=repr)) if v == v]
            node_value[node] = sum(scored) / len(scored) if scored else float("nan")
        return node_value[node]

    def segment_advantage(path: tuple, segment: int) -> float:
        parent_weight = discount ** (len(path) - segment)  # η^(J + 1 − i), J = len(path) − 1 segments
        return value_of(tuple(path[: segment + 1])) - parent_weight * value_of(tuple(path[:segment]))

    return _per_segment(rewards, paths, lengths, segment_length, segment_ends, segment_advantage)


def compute_node_value_advantages(
    rewards: torch.Tensor,
    paths: Sequence[Path],
    lengths: Sequence[int],
    segment_length: int,
    *,
    segment_ends: Sequence[Sequence[int] | None] | None = None,
) -> torch.Tensor:
    """Per-token advantages [B, max(lengths)] from per-node values: TreeRL's global + local process signal.

    Not in the TreePO paper; the per-node value credit of the tree-search RL work beside it (TreeRL, Hou et al. 2025;
    SPO's tree variant uses the local term alone). A node's value is the mean scored reward of the leaves below it,
    ``V(n) = mean_{k ∈ L(n)} R_k`` (the leaf's own value is its reward, the prompt's the mean over its tree). Segment
    i of a leaf whose path is n_0 (the prompt), n_1, …, n_J gets

        A_i = (V(n_i) − V(n_0)) + (V(n_i) − V(n_{i−1}))

    the global term: how much better than the prompt's average the leaves below n_i do; the local term: what the
    segment itself changed against its parent. A segment with no siblings has a local term of 0, so credit
    concentrates where the tree branched. Segments are laid out as in `compute_segment_advantages`; NaN rewards join
    no value and a node with no scored leaf gives NaN. Whiten the result with `whiten` and a token mask.
    """
    _check_inputs(rewards, paths, "average")
    # Every prefix of a path is a node, the whole path the leaf's own (the `None` makes it a group of its own).
    _, _, means = _group_means(rewards, [(*path, None) for path in paths])

    def value_of(node: tuple) -> float:
        return means.get(node, float("nan"))

    def segment_advantage(path: tuple, segment: int) -> float:
        node, parent, prompt = path[: segment + 1], path[:segment], path[:1]
        return 2 * value_of(node) - value_of(prompt) - value_of(parent)

    return _per_segment(rewards, paths, lengths, segment_length, segment_ends, segment_advantage)


def _per_segment(rewards, paths, lengths, segment_length, segment_ends, segment_advantage) -> torch.Tensor:
    """[B, max(lengths)]: `segment_advantage(path, i)` broadcast over the tokens of segment i (1-based) of each row.

    Segment i spans ``[(i-1)·l, i·l)``, or ``[ends[i-2], ends[i-1])`` where `segment_ends` gives the row's end
    offsets (segments cut short by a tool call); tokens past a row's length are 0."""
    if len(lengths) != len(paths):
        raise ValueError(f"Got {len(lengths)} lengths for {len(paths)} paths; pass one length per leaf.")
    width = max(lengths, default=0)
    advantages = torch.zeros(len(paths), width, dtype=torch.float64)
    for row, (path, length) in enumerate(zip(paths, lengths)):
        path = tuple(path)
        num_segments = len(path) - 1
        ends = segment_ends[row] if segment_ends is not None else None
        if ends is None:
            ends = [segment * segment_length for segment in range(1, num_segments + 1)]
        for segment in range(1, num_segments + 1):
            start = ends[segment - 2] if segment > 1 else 0
            if start >= length:
                break
            advantages[row, start : min(ends[segment - 1], length)] = segment_advantage(path, segment)
    return advantages.to(dtype=rewards.dtype, device=rewards.device)


def whiten(advantages: torch.Tensor, token_weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Token-level whitening over a whole batch, REINFORCE++-baseline style (the paper's normalisation).

    Args:
        advantages: [B] (one value per leaf) or [B, T] (per token).
        token_weights: how many valid tokens each entry stands for: [B] token counts for 1-D advantages, or a
            [B, T] 0/1 mask for 2-D ones.

    Returns the same shape with ``(a − μ) / sqrt(σ² + eps)``, μ and σ² being the token-weighted mean and unbiased
    variance over valid tokens. Entries with zero weight or NaN advantage come out as 0 and do not count.
    """
    if advantages.shape != token_weights.shape:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and token_weights {tuple(token_weights.shape)} must have the same "
            "shape ([B] token counts, or a [B, T] mask)."
        )
    values = advantages.double()
    weights = token_weights.double() * (~torch.isnan(values))
    values = torch.nan_to_num(values, nan=0.0)
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(advantages)
    mean = (weights * values).sum() / total
    variance = (weights * (values - mean) ** 2).sum() / (total - 1) if total > 1 else torch.zeros((), dtype=values.dtype)
    whitened = (values - mean) / torch.sqrt(variance + eps)
    return torch.where(weights > 0, whitened, torch.zeros_like(whitened)).to(advantages.dtype)
