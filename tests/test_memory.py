"""Memory, hook, loss and checkpoint tests on tiny random GPT-NeoX and Llama models (CPU, seconds)."""

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import load_memory, save_checkpoint
from document_memories import DocumentMemory
from hook_lm import MemoryHook, MemoryLM
from segment_data import SegmentData, batch_cross_entropy
from tiny_models import HIDDEN_SIZE, VOCAB_SIZE, build_llama_like, build_pythia_like
from utils import guidance_loss, head_sequence_cross_entropy, negative_docreps, sequence_cross_entropy


def tiny_model(family: str):
    torch.manual_seed(0)
    model = build_pythia_like() if family == "gpt_neox" else build_llama_like(num_layers=3)
    model.eval().requires_grad_(False)
    return model


def make_memory(num_documents: int = 3, **kwargs) -> DocumentMemory:
    settings = dict(hidden_size=HIDDEN_SIZE, hook_memory_dim=8, num_documents=num_documents, seed=0)
    settings.update(kwargs)
    return DocumentMemory(**settings)


def make_data(num_segments: int = 5, num_documents: int = 3) -> SegmentData:
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 12, 9, 12, 5, 10, 11][:num_segments]
    token_ids = [torch.randint(1, VOCAB_SIZE, (length,), generator=generator) for length in lengths]
    labels = [index % num_documents for index in range(num_segments)]
    return SegmentData(token_ids, labels, pad_token_id=0)


FAMILIES = ["gpt_neox", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_changes_output_and_is_removed(family):
    model = tiny_model(family)
    memory = make_memory()
    memory_lm = MemoryLM(model, memory, hook_memory_layer=1)
    batch = make_data().collate([0, 1])
    before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    with MemoryHook(memory_lm.block, memory, memory.docreps[batch.labels]):
        hooked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    assert not torch.allclose(before, hooked)
    assert torch.equal(before, after)
    assert len(memory_lm.block._forward_hooks) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_removed_after_exception(family):
    model = tiny_model(family)
    memory = make_memory()
    block = MemoryLM(model, memory, hook_memory_layer=0).block
    with pytest.raises(RuntimeError, match="boom"):
        with MemoryHook(block, memory, None):
            raise RuntimeError("boom")
    assert len(block._forward_hooks) == 0
    # the block can take a memory again once the first one is gone
    with MemoryHook(block, memory, None):
        assert len(block._forward_hooks) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_second_attach_rejected(family):
    model = tiny_model(family)
    memory = make_memory()
    block = MemoryLM(model, memory, hook_memory_layer=-1).block
    with MemoryHook(block, memory, None):
        with pytest.raises(RuntimeError, match="already attached"):
            with MemoryHook(block, memory, None):
                pass
        assert len(block._forward_hooks) == 1
    assert len(block._forward_hooks) == 0


def test_hook_accepts_tuple_output():
    class TupleBlock(torch.nn.Module):
        def forward(self, hidden):
            return hidden * 2, "extra"

    memory = make_memory()
    tuple_module = TupleBlock()
    hidden = torch.randn(2, 4, HIDDEN_SIZE)
    with MemoryHook(tuple_module, memory, memory.docreps[:2]):
        output, extra = tuple_module(hidden)
    assert extra == "extra"
    torch.testing.assert_close(output, hidden * 2 + memory(hidden * 2, memory.docreps[:2]))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_memory_leaves_logits_unchanged(family):
    model = tiny_model(family)
    memory = make_memory(lm_act="gelu")
    torch.nn.init.zeros_(memory.lmm_proj.weight)
    torch.nn.init.zeros_(memory.lmm_proj.bias)
    memory_lm = MemoryLM(model, memory, hook_memory_layer=1)
    batch = make_data().collate([0, 1, 2])
    with_memory = memory_lm.logits(batch.input_ids, batch.attention_mask, memory.docreps[batch.labels])
    without = memory_lm.logits(batch.input_ids, batch.attention_mask, None, memory_on=False)
    torch.testing.assert_close(with_memory, without, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [False, True])
def test_loss_same_alone_and_left_padded(family, use_cache):
    model = tiny_model(family)
    memory = make_memory()
    memory_lm = MemoryLM(model, memory, hook_memory_layer=1)
    data = make_data()
    if use_cache:
        data.build_activation_cache(memory_lm, batch_size=2, device=torch.device("cpu"))
    # segment 0 (7 tokens) is left-padded to 12 tokens in the batch
    batch = data.collate([0, 1, 2])
    assert batch.attention_mask[0].sum() == 7
    batched = batch_cross_entropy(memory_lm, batch, memory.docreps[batch.labels])
    alone = data.collate([0])
    single = batch_cross_entropy(memory_lm, alone, memory.docreps[alone.labels])
    torch.testing.assert_close(batched[0], single[0], rtol=1e-5, atol=1e-5)


def test_pad_tokens_not_in_loss():
    logits = torch.randn(1, 4, VOCAB_SIZE)
    input_ids = torch.tensor([[0, 0, 5, 6]])
    attention_mask = torch.tensor([[0, 0, 1, 1]])
    # only position 2 predicting token 6 counts
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], input_ids[0, 3:4])
    torch.testing.assert_close(sequence_cross_entropy(logits, input_ids, attention_mask)[0], expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_fused_head_ce_matches_logits(chunk_size):
    generator = torch.Generator().manual_seed(0)
    final_hidden = torch.randn(3, 7, HIDDEN_SIZE, dtype=torch.float64, generator=generator)
    weight = torch.randn(VOCAB_SIZE, HIDDEN_SIZE, dtype=torch.float64, generator=generator)
    input_ids = torch.randint(0, VOCAB_SIZE, (3, 7), generator=generator)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[0, :3] = 0
    upstream = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    fused_input = final_hidden.clone().requires_grad_(True)
    fused = head_sequence_cross_entropy(fused_input, weight, input_ids, attention_mask, chunk_size)
    (fused * upstream).sum().backward()
    plain_input = final_hidden.clone().requires_grad_(True)
    plain = sequence_cross_entropy(plain_input @ weight.T, input_ids, attention_mask)
    (plain * upstream).sum().backward()

    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_input.grad, plain_input.grad, rtol=1e-6, atol=1e-6)


def test_guidance_loss_code_form_by_hand():
    ce_positive = torch.tensor([2.0, 3.0])
    ce_negative = torch.tensor([4.0, 9.0])
    # (4 - 4.5)^2 = 0.25 < 2 -> 2 + 0.1 * 0.25; (9 - 4.5)^2 = 20.25 > 3 -> 3 + 0.1 * 3
    expected = torch.tensor([2.025, 3.3])
    torch.testing.assert_close(guidance_loss(ce_positive, ce_negative, 0.1, 4.5, "code"), expected)


def test_guidance_loss_paper_form_by_hand():
    ce_positive = torch.tensor([2.0, 3.0])
    ce_negative = torch.tensor([4.0, 9.0])
    # 2 + 0.5 * |4.5 - 4| = 2.25; 3 + 0.5 * |4.5 - 9| = 5.25
    expected = torch.tensor([2.25, 5.25])
    torch.testing.assert_close(guidance_loss(ce_positive, ce_negative, 0.5, 4.5, "paper"), expected)


def test_negative_other_never_own():
    docreps = torch.randn(4, 2)
    labels = torch.arange(4).repeat(50)
    generator = torch.Generator().manual_seed(0)
    negatives = negative_docreps(docreps, labels, "other", generator)
    own = docreps[labels]
    assert not (negatives == own).all(dim=1).any()
    used = {tuple(row.tolist()) for row in negatives}
    assert len(used) == 4


def test_negative_zero_and_perturb():
    docreps = torch.randn(3, 2)
    labels = torch.tensor([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(negative_docreps(docreps, labels, "zero", generator), torch.zeros(3, 2))
    perturbed = negative_docreps(docreps, labels, "perturb", generator, perturb_std=0.01)
    assert (perturbed - docreps).abs().max() < 0.1
    assert not torch.equal(perturbed, docreps)


def test_lm_frozen_only_memory_trains():
    model = tiny_model("llama")
    memory = make_memory()
    memory_lm = MemoryLM(model, memory, hook_memory_layer=1)
    batch = make_data().collate([0, 1, 2])
    loss = batch_cross_entropy(memory_lm, batch, memory.docreps[batch.labels]).mean()
    loss.backward()
    assert all(not parameter.requires_grad for parameter in model.parameters())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert all(parameter.grad is not None for parameter in memory.parameters())
    assert not memory.docreps.requires_grad


@pytest.mark.parametrize("negative_key_type", ["other", "random", "zero", "perturb"])
@pytest.mark.parametrize("module_type", ["linear", "nonlinear"])
@pytest.mark.parametrize("key_activation", ["tanh", "swiglu"])
def test_training_step_changes_memory(negative_key_type, module_type, key_activation):
    model = tiny_model("gpt_neox")
    memory = make_memory(document_key_module_type=module_type, key_activation=key_activation)
    memory_lm = MemoryLM(model, memory, hook_memory_layer=-1)
    optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-2)
    batch = make_data().collate([0, 1, 2, 3])
    generator = torch.Generator().manual_seed(0)
    before = {name: value.clone() for name, value in memory.state_dict().items()}

    own = memory.docreps[batch.labels]
    negative = negative_docreps(memory.docreps, batch.labels, negative_key_type, generator)
    ce_positive, ce_negative = batch_cross_entropy(memory_lm, batch, torch.cat([own, negative])).chunk(2)
    loss = guidance_loss(ce_positive, ce_negative, 0.1, 4.5, "code").mean()
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    key_weights = [name for name in before if name.startswith("key_generator")]
    assert any(not torch.equal(before[name], memory.state_dict()[name]) for name in key_weights)
    assert torch.equal(before["docreps"], memory.docreps)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reload_same_outputs(family, tmp_path):
    model = tiny_model(family)
    memory = make_memory(key_activation="sigmoid", document_key_module_type="nonlinear")
    optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-3)
    memory_lm = MemoryLM(model, memory, hook_memory_layer=1)
    batch = make_data().collate([0, 1, 2])
    batch_cross_entropy(memory_lm, batch, memory.docreps[batch.labels]).mean().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, memory, optimizer, state={"epoch": 1})

    reloaded = load_memory(path)
    tensors = load_file(str(path))
    assert torch.equal(tensors["memory.docreps"], memory.docreps)
    expected = memory_lm.logits(batch.input_ids, batch.attention_mask, memory.docreps[batch.labels])
    again = MemoryLM(model, reloaded, hook_memory_layer=1)
    actual = again.logits(batch.input_ids, batch.attention_mask, reloaded.docreps[batch.labels])
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, -1])
def test_cache_matches_full_path(family, layer):
    model = tiny_model(family)
    data = make_data()
    losses, gradients = [], []
    for use_cache in (False, True):
        memory = make_memory()
        memory_lm = MemoryLM(model, memory, hook_memory_layer=layer)
        if use_cache:
            data.build_activation_cache(memory_lm, batch_size=3, device=torch.device("cpu"))
        else:
            data.hidden_states = None
        batch = data.collate([0, 1, 2, 4])  # left padding in rows 0, 2 and 3
        own = memory.docreps[batch.labels]
        negative = memory.docreps[(batch.labels + 1) % 3]
        ce_positive, ce_negative = batch_cross_entropy(memory_lm, batch, torch.cat([own, negative])).chunk(2)
        loss = guidance_loss(ce_positive, ce_negative, 0.1, 4.5, "code").mean()
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: p.grad.clone() for name, p in memory.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-4, atol=1e-5)
