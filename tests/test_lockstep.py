"""Every rank in step under sharded training: two CPU ranks with the model sharded by `fully_shard` (FSDP2) grow
deliberately uneven trees and pack them unevenly, finish within a timeout (a rank with fewer forwards would wait
forever), and compute what one unsharded process computes."""

import sys
from pathlib import Path

import pytest
import torch

from trl_treepo.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from ranks import run_two_ranks  # noqa: E402  (tests/ is not a package)


@pytest.fixture(scope="module")
def sharded_run(tiny_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("sharded")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "tests/sharded_job.py"), tiny_model, str(output)]  # fmt: skip
    return run_two_ranks(command, output)


def test_uneven_trees_and_packing_finish_under_fully_shard(sharded_run):
    first, second = sharded_run
    assert first["levels"] != second["levels"]  # the premise: one rank's trees need more levels than the other's
    assert first["verified"] is True and second["verified"] is True
    assert all(run["gradient"] > 0 and run["gradient"] == run["gradient"] for run in sharded_run)


def test_sharded_ranks_compute_what_one_process_computes(sharded_run, tiny_model):
    from sharded_job import first_token, grow, prompts_of, rows_of, unpacked_logps
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    eos = first_token(model, prompts_of(0)[0])
    for rank, run in enumerate(sharded_run):
        assert run["eos"] == eos
        rollout = grow(model, prompts_of(rank), eos)  # greedy: the same trees, token for token
        leaves = rollout.flat_leaves()
        assert [(leaf.prompt_index, leaf.token_ids) for leaf in leaves] == [tuple(pair) for pair in run["leaves"]]
        ids, mask, width = rows_of(prompts_of(rank), leaves, pad=0)
        with torch.no_grad():
            expected = unpacked_logps(model, ids, mask, width)[0]
        valid = mask[:, -width:].bool()
        torch.testing.assert_close(torch.tensor(run["logps"])[valid], expected[valid], rtol=1e-5, atol=1e-5)
