"""Tree-packed training: linear-memory tree attention gives the unpacked log-probs, losses and gradients, on the
models where that can be exact; the others fall back to the unpacked forward, with a warning that names why."""

import logging
import random

import pytest
import torch
from test_trainer import reward_length, tiny_args, train
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from trl_treepo import TreePOTrainer
from trl_treepo.packing import TreeAttention, install_tree_attention, pack_rows, shuffle_whole_trees
from trl_treepo.testing import make_math_dataset, make_tiny_model

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def layout(rows):
    """TRL's row layout: prompts left-padded, completions right-padded."""
    prompt_width = max(len(p) for p, _ in rows)
    width = max(max(len(c) for _, c in rows), 1)
    ids = torch.zeros(len(rows), prompt_width + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, completion) in enumerate(rows):
        ids[row, prompt_width - len(prompt) : prompt_width] = torch.tensor(prompt)
        mask[row, prompt_width - len(prompt) : prompt_width] = 1
        if completion:
            ids[row, prompt_width : prompt_width + len(completion)] = torch.tensor(completion)
            mask[row, prompt_width : prompt_width + len(completion)] = 1
    return ids, mask, width


def random_tree_rows(rng, prompts=2, leaves=6, vocabulary=(1, 2, 3), max_length=9):
    """Rows whose completions share random prefixes: the shapes a tree produces, duplicates and prefixes included."""
    rows = []
    for index in range(prompts):
        prompt = [100 + index] * rng.randint(1, 4)
        stems = [[rng.choice(vocabulary) for _ in range(rng.randint(0, max_length))] for _ in range(3)]
        for _ in range(leaves):
            stem = rng.choice(stems)
            rows.append((prompt, stem[: rng.randint(0, len(stem))] + [rng.choice(vocabulary) for _ in range(rng.randint(1, 3))]))
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("max_tokens", [None, 12])
def test_every_predictor_sees_exactly_its_rows_prefix_at_the_right_depth(seed, max_tokens):
    """The packed layout is the rows' tries: each completion token is predicted by a position that holds the previous
    token, at its depth, and attends to exactly the row's earlier tokens, each at its own depth."""
    rows = random_tree_rows(random.Random(seed))
    ids, mask, width = layout(rows)
    packed = pack_rows(ids, mask, width, max_tokens=max_tokens, chunk=4)
    tokens = torch.cat([s.input_ids[0] for s in packed.sequences])
    depths = torch.cat([s.position_ids[0] for s in packed.sequences])
    labels = torch.cat([s.shift_labels[0] for s in packed.sequences])
    starts = [0]
    for s in packed.sequences:
        starts.append(starts[-1] + s.input_ids.size(1))
    for row, (prompt, completion) in enumerate(rows):
        sequence = prompt + completion
        for t, token in enumerate(completion):
            position = packed.predictor[row, t].item()
            index = max(i for i, start in enumerate(starts[:-1]) if start <= position)
            local = position - starts[index]
            assert labels[position] == token and tokens[position] == sequence[len(prompt) + t - 1]
            assert depths[position] == len(prompt) + t - 1
            seen = packed.sequences[index].tree.dense_mask()[0, 0, local].nonzero().flatten() + starts[index]
            assert sorted(depths[seen].tolist()) == list(range(len(prompt) + t))
            assert [tokens[p].item() for p in seen[depths[seen].argsort()]] == sequence[: len(prompt) + t]
    assert packed.completion_mask.sum().item() == sum(len(c) for _, c in rows)
    if max_tokens is None:
        assert len(packed.sequences) == 1 and packed.packed_tokens <= packed.row_tokens


def test_the_budget_splits_packs_and_a_trie_larger_than_it_by_leaves():
    prompt = [7] * 4
    rows = [(prompt, [1] * 6 + [k]) for k in range(2, 8)] + [([9, 9], [5, 5])]
    ids, mask, width = layout(rows)
    whole = pack_rows(ids, mask, width)
    assert whole.packed_tokens == 4 + 6 + 6 + 5 + 4  # prompt, the shared six, six leaves, five copies; second prompt
    split = pack_rows(ids, mask, width, max_tokens=16)
    assert all(s.input_ids.size(1) <= 16 for s in split.sequences) and len(split.sequences) > 1
    assert split.packed_tokens > whole.packed_tokens  # the split tries each repeat the shared prefix


def packable_model(family, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(family), family=family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    return model


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("max_tokens, chunk", [(None, 512), (40, 3)])
def test_packed_log_probs_and_entropies_equal_the_unpacked_ones(tmp_path_factory, family, max_tokens, chunk):
    install_tree_attention()
    model = packable_model(family, tmp_path_factory)
    rng = random.Random(0)
    rows = random_tree_rows(rng, vocabulary=tuple(range(10, 8000)), max_length=12)
    ids, mask, width = layout(rows)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-width] = -100
    unpacked = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    packed = pack_rows(ids, mask, width, max_tokens=max_tokens, chunk=chunk)
    outputs = [
        model(input_ids=s.input_ids, attention_mask=s.attention_mask, position_ids=s.position_ids,
              shift_labels=s.shift_labels, fused_lm_head=True, tree_attention=s.tree)
        for s in packed.sequences
    ]  # fmt: skip
    valid = mask[:, -width:].bool()
    for field in ("log_probs", "entropy"):
        got = packed.unpack([getattr(o, field) for o in outputs])
        torch.testing.assert_close(got[valid], getattr(unpacked, field)[:, -width:][valid], rtol=1e-5, atol=1e-5)
        assert (got[~valid] == 0).all()
    assert packed.packed_tokens < packed.row_tokens


def test_the_default_path_never_builds_an_l_by_l_mask(tmp_path_factory, monkeypatch):
    """The attention sees a 1-element placeholder instead of a mask, and every SDPA mask is a view of one
    `chunk × (longest path + chunk)` buffer, however long the packed sequence."""
    install_tree_attention()
    model = packable_model("qwen2", tmp_path_factory)
    rows = random_tree_rows(random.Random(1), prompts=6, leaves=8, vocabulary=tuple(range(10, 8000)), max_length=40)
    ids, mask, width = layout(rows)
    (sequence,) = pack_rows(ids, mask, width, chunk=16).sequences
    length = sequence.input_ids.size(1)
    seen_masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        seen_masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(TreeAttention, "dense_mask", lambda self: pytest.fail("the dense mask was built"))
    assert sequence.attention_mask.numel() == 1
    model(input_ids=sequence.input_ids, attention_mask=sequence.attention_mask, position_ids=sequence.position_ids,
          shift_labels=sequence.shift_labels, fused_lm_head=True, tree_attention=sequence.tree)  # fmt: skip
    storages = {m.untyped_storage().data_ptr() for m in seen_masks}
    (buffer,) = sequence.tree._mask_buffers.values()
    assert storages == {buffer.untyped_storage().data_ptr()}
    assert buffer.numel() == 16 * (sequence.tree.longest_path + 16) < length * length / 4
    assert all(m.size(0) <= 16 for m in seen_masks)


def test_whole_trees_are_shuffled_with_trls_random_draw():
    prompts = torch.tensor([[1, 1], [1, 1], [2, 2], [2, 2], [2, 2], [3, 3]])
    batch = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "rows": list(range(6)),
             "num_items_in_batch": torch.tensor(5)}  # fmt: skip
    torch.manual_seed(3)
    shuffled = shuffle_whole_trees(batch)
    after_ours = torch.rand(1)
    torch.manual_seed(3)
    torch.randperm(6)
    assert torch.equal(after_ours, torch.rand(1))  # TRL's shuffle leaves the same random state
    groups = [shuffled["prompt_ids"][i, 0].item() for i in range(6)]
    order = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
    assert sorted(order) == [1, 2, 3]  # each prompt's rows stay together
    members = {1: [0, 1], 2: [2, 3, 4], 3: [5]}
    assert shuffled["rows"] == [row for group in order for row in members[group]]  # and in their order
    assert shuffled["num_items_in_batch"] is batch["num_items_in_batch"]


# ------------------------------------------------------------------------------------- losses and gradients


def branching_script(kind):
    """Segments of shapes a tree produces, for the packed-versus-unpacked matrix."""

    def respond(encode, eos, request, branch):
        rng = random.Random(hash((tuple(request.token_ids), branch, kind)) % 2**32)
        words = [rng.randrange(300, 8000) for _ in range(request.max_tokens)]
        if kind == "early_stops" and branch % 2:
            return words[: rng.randint(1, 3)] + [eos]  # stops: budget moves to the survivors, fallbacks happen
        if kind == "identical":
            return [500 + (len(request.token_ids) % 7)] * request.max_tokens  # every sibling the same: duplicate rows
        return words

    return respond


def micro_batches(trainer, dataset, num_prompts):
    """The micro-batches `_prepare_inputs` buffers for one generation batch (tree-aware with packing on)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer._step, trainer._buffered_inputs = 0, None
    trainer._prepare_inputs([dataset[i] for i in range(num_prompts) for _ in range(trainer.num_generations)])
    return list(trainer._buffered_inputs)


def loss_and_gradients(trainer, inputs, packed):
    trainer.args.tree_packed_training = packed
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    gradients = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), gradients


CASES = [(loss, "random") for loss in LOSS_TYPES] + [("dapo", "early_stops"), ("grpo", "identical")]


@pytest.mark.parametrize("loss_type, shape", CASES)
def test_packed_loss_and_gradients_equal_the_unpacked_ones(tiny_model, tmp_path, scripted_rollouts, loss_type, shape):
    """Every loss type, with gradient accumulation 2, two iterations, beta > 0 and the entropy mask."""
    scripted_rollouts(branching_script(shape))
    dataset = make_math_dataset(size=4)
    trainer = TreePOTrainer(
        model=tiny_model,
        reward_funcs=reward_length,
        args=tiny_args(tmp_path, loss_type=loss_type, beta=0.05, top_entropy_quantile=0.8, num_iterations=2,
                       gradient_accumulation_steps=2, per_device_train_batch_size=4, tree_packed_training=True,
                       tree_filter_zero_std_prompts=False),  # fmt: skip
        train_dataset=dataset,
    )
    batches = micro_batches(trainer, dataset, num_prompts=2)
    assert len(batches) == 2
    with torch.no_grad():  # a second iteration over the batch, so that ratios and clipping are not all trivial
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for inputs in batches:
        assert len({tuple(row.tolist()) for row in inputs["prompt_ids"]}) == 1  # a micro-batch is one whole tree
        unpacked_loss, unpacked = loss_and_gradients(trainer, inputs, packed=False)
        packed_loss, packed = loss_and_gradients(trainer, inputs, packed=True)
        torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-4, atol=1e-6)
        assert packed.keys() == unpacked.keys() and len(packed) > 0
        for name, gradient in unpacked.items():
            torch.testing.assert_close(packed[name], gradient, rtol=1e-3, atol=1e-6, msg=name)
    assert trainer._metrics["train"]["tree/packed_token_ratio"][-1] < 1.0


@pytest.mark.parametrize(
    "loss_type, rows_per_device",
    [("dapo", 4), ("grpo", 4), ("dapo", 6)],  # 6: three trees in two micro-batches, one tree split between them
)
def test_packed_training_ends_with_the_weights_of_unpacked_training(tiny_model, tmp_path, loss_type, rows_per_device):
    """Two optimizer steps over one generation (gradient accumulation 2, two iterations, beta > 0): each step's
    gradient sums the whole generation batch, so whole-tree micro-batches reach the same weights as TRL's rows.

    Plain SGD, because Adam's first steps divide each gradient by its own magnitude, which turns float noise in
    near-zero gradients into visible weight differences.
    """
    weights = {}
    for packed in (False, True):
        trainer, logs, changed, _ = train(
            tiny_model, tmp_path / str(packed), max_steps=2, loss_type=loss_type, beta=0.05, num_iterations=2,
            gradient_accumulation_steps=2, per_device_train_batch_size=rows_per_device, tree_packed_training=packed,
            optim="sgd", learning_rate=1.0,
        )  # fmt: skip
        assert changed and ("tree/packed_token_ratio" in logs[0]) == packed
        weights[packed] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for name, weight in weights[False].items():
        torch.testing.assert_close(weights[True][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def lora():
    from peft import LoraConfig

    return {"peft_config": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")}


@pytest.mark.parametrize(
    "overrides, trainer_kwargs",
    [({}, None), ({"gradient_checkpointing": True}, None), ({}, "lora"), ({"tree_packed_max_tokens": 160}, None)],
    ids=["plain", "gradient_checkpointing", "lora", "token_budget"],
)
def test_packed_training_trains_and_logs_its_sharing(tiny_model, tmp_path, overrides, trainer_kwargs):
    trainer, logs, changed, _ = train(tiny_model, tmp_path, max_steps=2, tree_packed_training=True,
                                      trainer_kwargs=lora() if trainer_kwargs == "lora" else None,
                                      **overrides)  # fmt: skip
    assert changed and trainer._packed_forward.verified
    assert all(0 < entry["tree/packed_token_ratio"] < 1 for entry in logs)


# ------------------------------------------------------------------------------------------- exact or refused

REFUSED = {
    "mistral": "DynamicSlidingWindowLayer",
    "gemma3": "DynamicSlidingWindowLayer",
    "lfm2": "LinearAttentionLayer",
    "nemotron_h": "LinearAttentionLayer",
    "qwen3_next": "LinearAttentionLayer",
    "gpt2": "absolute position embeddings",
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_models_where_packing_cannot_be_exact_train_unpacked_with_a_warning(
    tmp_path_factory, tmp_path, family, caplog
):
    model = make_tiny_model(tmp_path_factory.mktemp(family), family=family)
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        trainer, logs, changed, _ = train(model, tmp_path, max_steps=1, tree_packed_training=True)
    assert changed and "tree/packed_token_ratio" not in logs[0]
    (warning,) = [r.getMessage() for r in caplog.records if "falls back to the unpacked forward" in r.getMessage()]
    assert REFUSED[family] in warning


@pytest.mark.parametrize("family", ["stablelm", "nemotron", "falcon"])
def test_attention_that_misses_the_tree_is_caught_by_construction(tmp_path_factory, tmp_path, family, caplog):
    """StableLM's and Nemotron's decoder layers drop the attention keyword arguments, and Falcon calls SDPA itself: the
    architecture checks pass them, but their attention never sees the tree (it would be bidirectional). Every packed
    forward counts the layers that attended with the tree, so packing turns itself off on the first batch."""
    model = make_tiny_model(tmp_path_factory.mktemp(family), family=family)
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        trainer, logs, changed, _ = train(model, tmp_path, max_steps=1, tree_packed_training=True)
    assert changed and trainer._packed_forward.verified is False and "tree/packed_token_ratio" not in logs[0]
    (warning,) = [r.getMessage() for r in caplog.records if "attended with the tree" in r.getMessage()]
    assert "of the model's 2 attention layers" in warning


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_moe_models_with_router_logits_pack_what_needs_no_load_balancing_loss(tmp_path_factory, tmp_path, family,
                                                                               caplog):  # fmt: skip
    """`output_router_logits=True`: the loss's forward needs the load-balancing loss and runs unpacked; the old and
    reference log-probs (`num_iterations=2`, `beta > 0`) are packed, without the router loss, which would read the
    placeholder mask."""
    model = make_tiny_model(tmp_path_factory.mktemp(family), family=family)
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        trainer, logs, changed, _ = train(model, tmp_path, max_steps=2, tree_packed_training=True, num_iterations=2,
                                          beta=0.01)  # fmt: skip
    assert changed and trainer._packed_forward.verified is True
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert any("load-balancing loss is computed per row" in r.getMessage() for r in caplog.records)


def test_dropout_in_training_is_not_packed(tmp_path_factory, tmp_path, caplog):
    model = make_tiny_model(tmp_path_factory.mktemp("dropout"))
    config = AutoModelForCausalLM.from_pretrained(model).config
    config.attention_dropout = 0.1
    config.save_pretrained(model)
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        _, logs, changed, _ = train(model, tmp_path, max_steps=1, tree_packed_training=True)
    assert changed and "tree/packed_token_ratio" not in logs[0]
    assert any("attention_dropout is 0.1" in r.getMessage() for r in caplog.records)


def test_the_self_check_bounds_follow_the_precision():
    from trl_treepo.packing import packing_tolerance

    fp32, tf32, bf16 = packing_tolerance(torch.float32), packing_tolerance(torch.float32, tf32=True), packing_tolerance(
        torch.bfloat16
    )
    # exact packing measured at most 2e-6 (fp32), 1e-2 (bf16) per position; attention that misses the tree, 0.25 and up
    assert fp32[0] >= 10 * 2e-6 and bf16[0] >= 5 * 1e-2 and fp32 < tf32 < bf16
    assert all(absolute + relative * 9.0 < 0.25 for absolute, relative in (fp32, tf32, bf16))  # |log p| of a uniform 8k


def test_eager_attention_falls_back_and_names_the_fix(tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        _, logs, changed, _ = train(tiny_model, tmp_path, max_steps=1, tree_packed_training=True,
                                    model_init_kwargs={"attn_implementation": "eager"})  # fmt: skip
    assert changed and "tree/packed_token_ratio" not in logs[0]
    assert any("'eager'" in r.getMessage() and "attn_implementation='sdpa'" in r.getMessage() for r in caplog.records)


def test_the_first_use_self_check_turns_packing_off_when_it_is_not_exact(tmp_path_factory, tmp_path, monkeypatch,
                                                                         caplog):  # fmt: skip
    """A model the architecture checks would let through, but whose packed log-probs are off: GPT-2's absolute
    positions, with the position check switched off. The first batch's comparison catches it."""
    import trl_treepo.architecture as architecture

    monkeypatch.setattr(architecture, "non_relative_positions", lambda model: None)
    model = make_tiny_model(tmp_path_factory.mktemp("gpt2"), family="gpt2")
    with caplog.at_level(logging.WARNING, logger="trl_treepo.trainer"):
        trainer, logs, changed, _ = train(model, tmp_path, max_steps=2, tree_packed_training=True)
    assert changed and trainer._packed_forward.verified is False
    assert all("tree/packed_token_ratio" not in entry for entry in logs)
    (warning,) = [r.getMessage() for r in caplog.records if "tree_packed_training is off" in r.getMessage()]
    assert "differ from the unpacked ones beyond the" in warning and "largest gap" in warning


def test_packed_log_probs_respect_trls_memory_chunks(tiny_model, tmp_path):
    dataset = make_math_dataset(size=4)
    trainer = TreePOTrainer(model=tiny_model, reward_funcs=reward_length,
                            args=tiny_args(tmp_path, tree_packed_training=True), train_dataset=dataset)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([dataset[i] for i in range(2) for _ in range(4)])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    results = {}
    for packed, batch_size in [(False, None), (True, None), (True, 3)]:
        trainer.args.tree_packed_training = packed
        with torch.no_grad():
            results[(packed, batch_size)] = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, width, batch_size=batch_size, compute_entropy=True
            )
    valid = inputs["completion_mask"].bool()
    for key in [(True, None), (True, 3)]:
        for got, want in zip(results[key][:2], results[(False, None)][:2]):
            torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
