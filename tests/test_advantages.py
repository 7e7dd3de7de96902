"""Tree advantages (paper Eq. 5–7, spec §6) on hand-computed trees."""

import math

import pytest
import torch

from trl_treepo import compute_tree_advantages
from trl_treepo.advantages import compute_node_value_advantages, compute_segment_advantages, whiten

# Spec §6.3: a binary tree of 8 leaves under prompt "q". Branch A = {A1: +1 +1, A2: -1 -1}, B = {B1: -1 +1, B2: -1 -1}.
PATHS = [
    ("q", "A", "A1", 1),
    ("q", "A", "A1", 2),
    ("q", "A", "A2", 3),
    ("q", "A", "A2", 4),
    ("q", "B", "B1", 5),
    ("q", "B", "B1", 6),
    ("q", "B", "B2", 7),
    ("q", "B", "B2", 8),
]
REWARDS = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0])


def test_average_weighting_matches_the_worked_example():
    advantages = compute_tree_advantages(REWARDS, PATHS)
    # group means: root -0.25; A 0; B -0.5; A1 +1; A2 -1; B1 0; B2 -1
    expected = [
        (1.25 + 1.0 + 0.0) / 3,
        (1.25 + 1.0 + 0.0) / 3,
        (-0.75 - 1.0 + 0.0) / 3,
        (-0.75 - 1.0 + 0.0) / 3,
        (-0.75 - 0.5 - 1.0) / 3,
        (1.25 + 1.5 + 1.0) / 3,
        (-0.75 - 0.5 + 0.0) / 3,
        (-0.75 - 0.5 + 0.0) / 3,
    ]
    torch.testing.assert_close(advantages, torch.tensor(expected))
    assert advantages[0].item() == pytest.approx(0.75)
    assert advantages[5].item() == pytest.approx(1.25)


def test_group_size_weighting_weights_each_term_by_its_group():
    advantages = compute_tree_advantages(REWARDS, PATHS, weighting="group_size")
    # leaf 0: terms 1.25 (|G|=8), 1.0 (|G_1|=4), 0.0 (|G_2|=2)
    assert advantages[0].item() == pytest.approx((8 * 1.25 + 4 * 1.0 + 2 * 0.0) / 14)
    # leaf 4 (B1 wrong): -0.75 (8), -0.5 (4), -1.0 (2)
    assert advantages[4].item() == pytest.approx((8 * -0.75 + 4 * -0.5 + 2 * -1.0) / 14)


def test_rejection_drops_all_equal_subgroups_but_never_the_root():
    advantages = compute_tree_advantages(REWARDS, PATHS, reject_zero_std_subgroups=True)
    # leaf 0: A1 = {+1, +1} is dropped, A = {1, 1, -1, -1} stays
    assert advantages[0].item() == pytest.approx((1.25 + 1.0) / 2)
    # leaf 6: B2 = {-1, -1} dropped
    assert advantages[6].item() == pytest.approx((-0.75 - 0.5) / 2)
    # a prompt whose rewards are all equal keeps its (zero) root term
    flat = compute_tree_advantages(torch.ones(4), [("p", 1, 3), ("p", 1, 4), ("p", 2, 5), ("p", 2, 6)],
                                   reject_zero_std_subgroups=True)
    assert flat.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_singleton_subtrees_add_no_term_and_prompts_are_separate_groups():
    paths = [("p", 1, 10), ("p", 2, 11), ("r", 3, 12), ("r", 3, 13)]
    rewards = torch.tensor([1.0, 0.0, 5.0, 3.0])
    advantages = compute_tree_advantages(rewards, paths)
    # prompt p: lone chains, only the root term; prompt r: root group and node 3 are the same two leaves
    assert advantages.tolist() == pytest.approx([0.5, -0.5, 1.0, -1.0])


def test_fallback_branch_joins_its_source_ancestors():
    # leaf 3 was cut back to node 1 and re-grown: it shares node 1 with leaves 0 and 1
    paths = [("p", 1, 2, 4), ("p", 1, 2, 5), ("p", 6, 7, 8), ("p", 1, 9, 10)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = compute_tree_advantages(rewards, paths)
    root = 0.5
    node1 = 2 / 3
    node2 = 0.5
    assert advantages[3].item() == pytest.approx(((1 - root) + (1 - node1)) / 2)
    assert advantages[0].item() == pytest.approx(((1 - root) + (1 - node1) + (1 - node2)) / 3)


def test_unscored_leaves_are_left_out_of_group_statistics():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    paths = [("p", 1, 5), ("p", 1, 6), ("p", 2, 7), ("p", 2, 8)]
    advantages = compute_tree_advantages(rewards, paths)
    assert math.isnan(advantages[1].item())
    # root mean over the 3 scored leaves = 1/3; node 1 holds one scored leaf, so it adds no term
    assert advantages[0].item() == pytest.approx(1 - 1 / 3)
    assert advantages[2].item() == pytest.approx(((0 - 1 / 3) + 0.0) / 2)


def test_whiten_is_token_weighted_and_ignores_masked_and_nan_entries():
    advantages = torch.tensor([1.0, -1.0, 3.0, float("nan")])
    counts = torch.tensor([3.0, 1.0, 0.0, 5.0])
    result = whiten(advantages, counts)
    tokens = torch.tensor([1.0, 1.0, 1.0, -1.0])
    expected = (tokens - tokens.mean()) / torch.sqrt(tokens.var() + 1e-8)
    assert result[0].item() == pytest.approx(expected[0].item())
    assert result[1].item() == pytest.approx(expected[3].item())
    assert result[2].item() == 0.0 and result[3].item() == 0.0
    # the same numbers through a [B, T] mask
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float32)
    per_token = whiten(advantages[:, None].expand(4, 3).contiguous(), mask)
    assert per_token[0, 0].item() == pytest.approx(expected[0].item())
    assert per_token[1, 1].item() == 0.0
    assert whiten(torch.tensor([2.0]), torch.tensor([0.0])).tolist() == [0.0]


def test_segment_advantages_follow_the_released_estimator_on_the_worked_example():
    """The released `tree_rfpp_progress` estimator on the spec §6.3 tree (docs/algorithm.md has the same numbers).

    Leaf values size-weight (R - mean) over the root (8 leaves), depth-1 (4), depth-2 (2) groups and the leaf itself
    (1): the A1 leaves get (8·1.25 + 4·1 + 2·0 + 0) / 15 = 14/15. Nodes average their children; the root is 0.
    """
    lengths = [6] * 8
    advantages = compute_segment_advantages(REWARDS, PATHS, lengths, segment_length=2)
    leaf = {"A1": 14 / 15, "A2": -10 / 15, "B1-": -10 / 15, "B1+": 18 / 15, "B2": -8 / 15}
    a1, a2, b2 = leaf["A1"], leaf["A2"], leaf["B2"]
    b1 = (leaf["B1-"] + leaf["B1+"]) / 2
    a, b = (a1 + a2) / 2, (b1 + b2) / 2
    assert advantages.shape == (8, 6)
    expected_rows = {
        0: [a - 0, a1 - a, 0.0],  # A1 leaf: (2/15, 12/15, 0)
        2: [a - 0, a2 - a, 0.0],
        4: [b - 0, b1 - b, leaf["B1-"] - b1],
        5: [b - 0, b1 - b, leaf["B1+"] - b1],  # the correct B1 leaf: (-2/15, 6/15, 14/15)
        6: [b - 0, b2 - b, 0.0],
    }
    for row, per_segment in expected_rows.items():
        assert advantages[row].tolist() == pytest.approx([v for v in per_segment for _ in range(2)])
    assert advantages[5].tolist()[::2] == pytest.approx([-2 / 15, 6 / 15, 14 / 15])
    # η^(J+1-i): the parent term of the last segment gets η, the first η^J (here the root's 0 either way)
    discounted = compute_segment_advantages(REWARDS, PATHS, lengths, 2, discount=0.5)
    assert discounted[5].tolist()[::2] == pytest.approx([b, b1 - 0.25 * b, leaf["B1+"] - 0.5 * b1])


def test_segment_advantages_cut_at_each_leafs_length_and_skip_unscored_leaves():
    paths = [("p", 1, 2), ("p", 1, 3), ("p", 4, 5), ("p", 4, 6)]
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.0])
    advantages = compute_segment_advantages(rewards, paths, [4, 3, 4, 1], segment_length=2)
    assert advantages.shape == (4, 4)
    assert advantages[1, 3].item() == 0.0 and (advantages[3, 1:] == 0).all()
    assert torch.isnan(advantages[2, 2:]).all()  # its own segment: NaN, which whitening turns into 0
    assert not torch.isnan(advantages[[0, 1, 3]]).any()  # node 4 averages its one scored child


def test_node_value_advantages_add_the_global_and_local_terms_of_each_segment():
    """Per-node values on the spec §6.3 tree: V(n) is the mean reward of the leaves below n, and segment i gets
    (V(n_i) − V(prompt)) + (V(n_i) − V(n_{i−1}))."""
    value = {"q": -0.25, "A": 0.0, "B": -0.5, "A1": 1.0, "A2": -1.0, "B1": 0.0, "B2": -1.0}

    def expected(nodes: list[str], reward: float) -> list[float]:
        chain = ["q", *nodes]
        values = [value[node] for node in chain] + [reward]
        return [(values[i] - value["q"]) + (values[i] - values[i - 1]) for i in range(1, len(values))]

    advantages = compute_node_value_advantages(REWARDS, PATHS, [6] * 8, segment_length=2)
    assert advantages.shape == (8, 6)
    for row, nodes in enumerate([["A", "A1"]] * 2 + [["A", "A2"]] * 2 + [["B", "B1"]] * 2 + [["B", "B2"]] * 2):
        per_segment = expected(nodes, REWARDS[row].item())
        assert advantages[row].tolist() == pytest.approx([v for v in per_segment for _ in range(2)])
    assert advantages[0].tolist()[::2] == pytest.approx([0.5, 2.25, 1.25])  # by hand
    assert advantages[5].tolist()[::2] == pytest.approx([-0.5, 0.75, 2.25])  # the correct B1 leaf
    # A lone chain below a node: its segments' local terms are 0, the global terms remain.
    chain = compute_node_value_advantages(torch.tensor([1.0, 0.0]), [("p", 1, 2), ("p", 3, 4)], [4, 4], 2)
    assert chain[0].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])  # V(1) = 1, V(p) = 0.5: 0.5 + 0.5, then 0.5 + 0


def test_node_value_advantages_cut_at_each_leafs_length_and_leave_unscored_leaves_out():
    paths = [("p", 1, 2), ("p", 1, 3), ("p", 4, 5), ("p", 4, 6)]
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.0])
    advantages = compute_node_value_advantages(rewards, paths, [4, 3, 4, 1], segment_length=2)
    assert advantages[1, 3].item() == 0.0 and (advantages[3, 1:] == 0).all()
    assert torch.isnan(advantages[2, 2:]).all()  # its own segment: NaN, which whitening turns into 0
    # node 4 holds one scored leaf (reward 0); the prompt's value is the mean of the three scored leaves, 1/3
    assert advantages[3, 0].item() == pytest.approx((0 - 1 / 3) + (0 - 1 / 3))
    segmented = compute_node_value_advantages(rewards, paths, [4, 3, 4, 1], 2, segment_ends=[[1, 4], None, None, None])
    assert segmented[0].tolist() == pytest.approx([2 * 0.5 - 2 / 3] + [2 * 1.0 - 1 / 3 - 0.5] * 3)
    with pytest.raises(ValueError, match="lengths"):
        compute_node_value_advantages(rewards, paths, [4, 3], segment_length=2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="weighting"):
        compute_tree_advantages(REWARDS, PATHS, weighting="mean")
    with pytest.raises(ValueError, match="paths"):
        compute_tree_advantages(REWARDS, PATHS[:3])
    with pytest.raises(ValueError, match="at least one node"):
        compute_tree_advantages(torch.tensor([1.0]), [("p",)])
    with pytest.raises(ValueError, match="1-D"):
        compute_tree_advantages(REWARDS[None], PATHS)
    with pytest.raises(ValueError, match="same shape"):
        whiten(torch.ones(3), torch.ones(3, 2))
