"""`accelerate launch` with two CPU processes (gloo): whole trees per process, advantages over the right groups.

The job (multiprocess_job.py) trains two steps and dumps, per process, the rows it trained and what it gathered.
"""

import sys
from pathlib import Path

import pytest
import torch

from trl_treepo import compute_tree_advantages, whiten
from trl_treepo.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ranks import run_two_ranks  # noqa: E402  (tests/ is not a package)
WIDTH = 4


def accelerate_launch(*job_args: str) -> list[str]:
    """`accelerate launch` of multiprocess_job.py on two CPU processes."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "examples/accelerate_configs/multi_cpu.yaml"),
        "--main_process_port", str(free_port()),
        str(ROOT / "tests/multiprocess_job.py"), *job_args,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("two-processes")
    return run_two_ranks(accelerate_launch(tiny_model, str(output)), output)


def test_both_processes_train_the_same_model(two_process_run):
    first, second = two_process_run
    assert first["world_size"] == second["world_size"] == 2
    assert first["checksum"] == second["checksum"]
    untimed = [[{k: v for k, v in entry.items() if k != "step_time"} for entry in run["logs"]] for run in two_process_run]
    assert len(untimed[0]) == 2 and untimed[0] == untimed[1]
    assert all(entry["tree/decoded_tokens"] < entry["tree/leaf_tokens"] for entry in first["logs"])


def test_every_process_owns_whole_trees(two_process_run):
    for step in range(2):
        ranks = [run["steps"][step] for run in two_process_run]
        assert ranks[0]["paths"] == ranks[1]["paths"]  # the gathered view is the same everywhere
        everything = ranks[0]["paths"]
        roots_per_rank = []
        for rank, seen in enumerate(ranks):
            local = seen["local_paths"]
            assert everything[rank * len(local) : (rank + 1) * len(local)] == local
            roots = [eval(path)[0] for path in local]
            groups = [roots[i : i + WIDTH] for i in range(0, len(roots), WIDTH)]
            assert all(len(set(group)) == 1 for group in groups)  # a tree's leaves are consecutive rows here
            assert len({group[0] for group in groups}) == len(groups)
            for start in range(0, len(local), WIDTH):  # and they answer one prompt
                prompts = {
                    tuple(t for t, m in zip(seen["prompt_ids"][row], seen["prompt_mask"][row]) if m)
                    for row in range(start, start + WIDTH)
                }
                assert len(prompts) == 1
            roots_per_rank.append(set(roots))
        assert not roots_per_rank[0] & roots_per_rank[1]


def test_advantages_are_computed_over_the_gathered_tree_groups(two_process_run):
    for step in range(2):
        ranks = [run["steps"][step] for run in two_process_run]
        rewards = torch.tensor(ranks[0]["rewards"], dtype=torch.float64)  # gathered: every row of both processes
        assert ranks[1]["rewards"] == ranks[0]["rewards"]
        paths = [eval(path) for path in ranks[0]["paths"]]
        grouped = rewards.view(-1, WIDTH)
        informative = (grouped.max(dim=1).values > grouped.min(dim=1).values).repeat_interleave(WIDTH)
        counts = torch.tensor(ranks[0]["token_counts"] + ranks[1]["token_counts"], dtype=torch.float64)
        expected = compute_tree_advantages(torch.where(informative, rewards, torch.nan), paths)
        expected = torch.nan_to_num(whiten(expected, counts), nan=0.0)
        trained = torch.tensor(ranks[0]["advantages"] + ranks[1]["advantages"], dtype=torch.float64)
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)


def test_uneven_trees_keep_every_rank_in_step(tiny_model, tmp_path):
    """Rank 0's trees stop at once and fall back while rank 1's run the full depth, and they pack into different
    numbers of sequences: every step, both ranks still run as many policy forwards and `generate` calls (what FSDP
    and ZeRO-3 need, where each of them is a collective)."""
    first, second = run_two_ranks(accelerate_launch(tiny_model, str(tmp_path), "uneven"), tmp_path)
    assert first["packing"] is True and len(first["steps"]) == 2
    for step in first["steps"]:
        rank0, rank1 = step
        assert rank0 == rank1, f"ranks ran different numbers of forwards or generate calls: {step}"
        assert rank0["generate"] >= 3 and rank0["forward"] > rank0["generate"]
    # the premise: the ranks' trees differ in shape
    assert first["logs"][0]["tree/max_depth"] == 3 and first["logs"][0]["tree/fallback_events"] > 0
