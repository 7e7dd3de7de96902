"""Two-rank CPU jobs (gloo) for the multiprocess tests: launch one, wait for it, read what each rank wrote."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_two_ranks(command: list[str], output: Path) -> list[dict]:
    """Run `command` (a launcher of two ranks, each writing `output/rank{N}.json`) and return the ranks' results.

    One thread per rank, as the two share the machine's cores; a job that hangs (ranks out of step) fails at the
    timeout instead of stalling the suite."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((Path(output) / f"rank{rank}.json").read_text()) for rank in range(2)]
