"Sample packing: the sampler's invariants, the collator's layout, and packed == padded through a real model."
import math

import numpy as np
import pytest
import torch

from ftkit.packing import (MultipackBatchSampler, PackedCollator, PaddedCollator, cu_seqlens_from_position_ids,
                           pack_ffd, packing_plan, register_varlen_attention, unregister_varlen_attention, VARLEN_NAME)
from helpers import make_cfg, per_sample_losses, tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _varlen():
    register_varlen_attention()
    yield


def _samples(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def test_ffd_bins_respect_capacity_and_bin_size():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 300, 2000).tolist()
    bins = pack_ffd(lens, range(len(lens)), 512, bin_size=3)
    assert sorted(i for b in bins for i in b) == list(range(len(lens)))
    assert all(sum(lens[i] for i in b) <= 512 and len(b) <= 3 for b in bins)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_same_count_every_epoch_and_rank(world):
    rng = np.random.default_rng(world)
    lens = np.clip(rng.lognormal(4, 0.8, 700).astype(int), 2, 300).tolist()
    s = MultipackBatchSampler(lens, 600, num_epochs=4, world_size=world, seed=1)
    assert len(s) % world == 0
    for e in range(4):
        s.set_epoch(e)
        b = list(s)
        assert len(b) == len(s)
        assert all(sum(lens[i] for i in x) <= 600 for x in b)
        flat = [i for x in b for i in x]
        assert len(flat) == len(set(flat))
        assert len({len(b[r::world]) for r in range(world)}) == 1
    # the step count the Trainer derives from len() is what the epochs really yield
    assert s.efficiency() > 0.9


def test_sampler_skips_too_long():
    s = MultipackBatchSampler([10, 2000, 20], 100)
    assert s.too_long == 1 and all(1 not in b for b in s)


def test_collator_layout():
    b = PackedCollator(pad_token_id=5, pad_to_multiple_of=8)(_samples([3, 4]))
    assert b["input_ids"].shape == (1, 8)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 7, 8] and b["max_length_k"] == 4
    assert b["labels"][0, 3] == -100 and b["labels"][0, 7] == -100 and b["input_ids"][0, 7] == 5
    cu, mx = cu_seqlens_from_position_ids(b["position_ids"])
    assert cu.tolist() == b["cu_seq_lens_q"].tolist() and mx == 4


def _pack_vs_pad(attn, lengths=(9, 5, 12, 3), dtype=torch.float32):
    samples = _samples(lengths)
    packed = PackedCollator(pad_token_id=0, pad_to=40)(samples)
    padded = PaddedCollator(pad_token_id=0)(samples)
    m1, m2 = tiny_llama(attn=attn).to(dtype), tiny_llama(attn=attn).to(dtype)
    o1, o2 = m1(**packed), m2(**padded)
    starts = np.cumsum([0] + list(lengths))
    l1 = per_sample_losses(o1.logits, packed["labels"], [(0, starts[i], starts[i + 1]) for i in range(len(lengths))])
    l2 = per_sample_losses(o2.logits, padded["labels"], [(i, 0, n) for i, n in enumerate(lengths)])
    o1.loss.backward()
    o2.loss.backward()
    return l1, l2, o1.loss.item(), o2.loss.item(), m1, m2


@pytest.mark.parametrize("attn", [VARLEN_NAME, "sdpa", "eager"])
def test_packed_equals_padded_loss_and_grads(attn):
    l1, l2, b1, b2, m1, m2 = _pack_vs_pad(attn)
    assert np.allclose(l1, l2, atol=1e-5), (l1, l2)
    assert math.isclose(b1, b2, rel_tol=1e-5)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.slow
def test_flex_attention_packed_forward():
    "FlexAttention has no backward on the CPU (torch 2.13): check the document mask in the forward only."
    samples = _samples((9, 5, 12))
    packed = PackedCollator(pad_token_id=0, pad_to=32)(samples)
    padded = PaddedCollator(pad_token_id=0)(samples)
    m = tiny_llama(attn="flex_attention")
    with torch.no_grad():
        a, b = m(**packed), m(**padded)
    starts = np.cumsum([0, 9, 5, 12])
    l1 = per_sample_losses(a.logits, packed["labels"], [(0, starts[i], starts[i + 1]) for i in range(3)])
    l2 = per_sample_losses(b.logits, padded["labels"], [(i, 0, n) for i, n in enumerate((9, 5, 12))])
    assert np.allclose(l1, l2, atol=1e-5), (l1, l2)


@pytest.mark.parametrize("attn", [VARLEN_NAME, "sdpa"])
def test_changing_one_sample_leaves_others_unchanged(attn):
    samples = _samples((7, 6, 9))
    m = tiny_llama(attn=attn)
    other = [samples[0], {"input_ids": [9] * 6, "labels": [9] * 6}, samples[2]]
    col = PackedCollator(pad_token_id=0, pad_to=24)
    with torch.no_grad():
        a = m(**col(samples)).logits[0]
        b = m(**col(other)).logits[0]
    keep = torch.ones(24, dtype=torch.bool)
    keep[7:13] = False
    assert torch.equal(a[keep], b[keep]) or torch.allclose(a[keep], b[keep], atol=1e-6)
    assert not torch.allclose(a[7:13], b[7:13])


def test_varlen_without_precomputed_seqlens_and_with_mask():
    "Position ids alone give the segments; an attention mask hands over to SDPA (generation)."
    samples = _samples((5, 8))
    col = PackedCollator(pad_token_id=0, return_seq_lens=False)
    m = tiny_llama(attn=VARLEN_NAME)
    ref = tiny_llama(attn="sdpa")
    with torch.no_grad():
        assert torch.allclose(m(**col(samples)).logits, ref(**col(samples)).logits, atol=1e-5)
        pad = PaddedCollator(pad_token_id=0)(samples)
        assert torch.allclose(m(**pad).logits, ref(**pad).logits, atol=1e-5)
    out = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, use_cache=True)
    out2 = ref.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.tolist() == out2.tolist()


def test_register_is_explicit_and_undoable():
    from transformers import AttentionInterface
    assert unregister_varlen_attention()
    assert VARLEN_NAME not in AttentionInterface._global_mapping
    rep = register_varlen_attention()
    assert rep["registered"] == VARLEN_NAME and VARLEN_NAME in AttentionInterface._global_mapping


def test_packing_plan_from_config():
    from datasets import Dataset
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in [30, 50, 20, 90, 60, 10] * 20]})
    pp = packing_plan(make_cfg(micro_batch_size=2, sequence_len=100, num_epochs=2), ds)
    assert pp.capacity == 200 and pp.batches == len(pp.sampler) and 0.9 < pp.efficiency <= 1
    assert "packed batches" in str(pp)
