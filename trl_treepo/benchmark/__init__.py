"""Tree vs sequential rollouts on one engine: `python -m trl_treepo.benchmark`.

For one model and one set of prompts, the same engine samples (a) GRPO's sequential rollouts: `width` independent
completions per prompt of up to `segment_length × depth` tokens, and (b) TreePO's tree rollout with the same number
of leaves, the same length limit and the same sampling parameters. Runs alternate after a warm-up; medians are
reported per mode with the paper's throughput measures (§4.1): trajectories per second (TrajPS) and leaf tokens per
second (TokenPS), plus the tokens the engine actually decoded.

    speedup              = tree TokenPS / sequential TokenPS
    decoded_token_ratio  = tree decoded tokens / sequential decoded tokens
    efficiency           = speedup × decoded_token_ratio
    decode_rate_ratio    = tree decoded tokens per second / sequential decoded tokens per second

A tree can at best save what it does not decode, so `efficiency` near 1 means the per-level overhead is paid for.
Tree leaves run longer than independent samples (budget transfer hands a stopped path's branches to its surviving,
longer siblings), which lifts TokenPS; `decode_rate_ratio` is the engine-side measure free of that effect.
`--json` prints one JSON object on the last line. `--sweep-depths` varies depth at a fixed token budget (the paper's
depth × segment study) and `--plot` draws TokenPS against it. `--train` compares a full TreePOTrainer step with a
GRPOTrainer step at equal leaves, and a TreePOTrainer step with `tree_packed_training` (each shared prefix forwarded
once) against one without: step time, loss forward + backward time, and peak memory (CUDA allocations on a GPU, the
process's peak RSS on a CPU).

`--tools` is the agentic case: problems solved with a calculator tool (`testing.make_tool_dataset`, a tiny model
SFT-warmed to call it), rolled out (a) as GRPOTrainer's tool loop does, every completion running its own calls turn
by turn, and (b) as a tree through tool calls (docs/algorithm.md §8), where a call runs once per node. It adds the tool
calls each mode executed; `--tool-latency` makes every call take that many seconds, as a real tool would.

The package holds one module per benchmark: `harness.py` (results, engines, prompts, worker processes), `rollout.py`
(sequential vs tree rollouts, the depth sweep), `tools.py` (the agentic case), `training.py` (`--train`),
`packing.py` (`--packing`), and `cli.py` (the command line).
"""

from .cli import build_parser, main

__all__ = ["build_parser", "main"]
