import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM-CPU sizes its KV cache from a fraction of host memory unless told; a long test process would starve it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-init 8k-vocabulary Qwen2 with the offline Qwen tokenizer, built once per session."""
    from trl_treepo.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))
