"""The transformers segment engine: KV reuse is exact, and sampling logprobs are the sampling distribution's."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from trl_treepo import TreeSamplingParams, grow_trees
from trl_treepo.backends.transformers import TransformersSegmentEngine


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def greedy_tree(model, tokenizer, prompts, eos, reuse):
    config = GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    engine = TransformersSegmentEngine(model, config, tokenizer.pad_token_id, reuse_kv_cache=reuse)
    params = TreeSamplingParams(width=8, segment_length=4, max_depth=4, eos_token_ids=tuple(eos), seed=3)
    with torch.no_grad():
        return grow_trees(engine, prompts, params, tokenizer.decode), engine


def test_kv_reuse_gives_the_same_trees_as_rereading_every_prefix(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    merges = []
    original_merge = TransformersSegmentEngine._merge

    def counting_merge(self, parts):
        merges.append([len(rows) for rows, *_ in parts])
        return original_merge(self, parts)

    monkeypatch.setattr(TransformersSegmentEngine, "_merge", counting_merge)
    prompts = [tokenizer(text)["input_ids"] for text in ("What is 2 + 3?", "Hi", "Name three prime numbers.")]
    # Greedy decoding: pick as "EOS" the 6th token the model writes after the first prompt, so that prompt's paths
    # stop in their second segment and fall back, while the other prompts keep their cached rows.
    with torch.no_grad():
        continuation = model.generate(torch.tensor([prompts[0]]), max_new_tokens=8, do_sample=False)
    eos = [int(continuation[0, len(prompts[0]) + 5])]
    reused, engine = greedy_tree(model, tokenizer, prompts, eos, reuse=True)
    reread, _ = greedy_tree(model, tokenizer, prompts, eos, reuse=False)
    assert reused.stats.fallback_events > 0 and merges  # some levels mix cached rows and freshly prefilled ones
    assert [[(l.nodes, l.token_ids) for l in ls] for ls in reused.leaves] == [
        [(l.nodes, l.token_ids) for l in ls] for ls in reread.leaves
    ]
    # only the first level and the fallback starts were read from scratch
    assert engine.prefilled_tokens < sum(len(p) for p in prompts) + 8 * 4 * reused.stats.fallback_branches


def test_recorded_logprobs_are_those_of_the_warped_sampling_distribution(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer("Count to five:")["input_ids"]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=50, eos_token_id=[tokenizer.eos_token_id],
                              pad_token_id=tokenizer.pad_token_id)
    engine = TransformersSegmentEngine(model, config, tokenizer.pad_token_id, return_logprobs=True)
    params = TreeSamplingParams(width=2, segment_length=6, max_depth=2, eos_token_ids=(tokenizer.eos_token_id,))
    torch.manual_seed(0)
    with torch.no_grad():
        leaf = grow_trees(engine, [prompt], params, tokenizer.decode).leaves[0][0]
        logits = model(torch.tensor([prompt + leaf.token_ids])).logits[0, len(prompt) - 1 : -1] / 0.7
    kth = torch.topk(logits, 50).values[:, -1:]
    expected = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    expected = expected.gather(1, torch.tensor(leaf.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(leaf.logprobs), expected, atol=1e-4, rtol=1e-4)
