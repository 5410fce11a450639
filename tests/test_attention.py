"""Attention paths of `llm.model`: grouped K/V through SDPA's enable_gqa against K/V repeated to every head, and
packed documents given as (B, T) indices (SFTCollator's) against the dense block-causal mask the collator used to
ship — on CPU through the mask the model builds, and through the flash-attn variable-length branch with a
pure-PyTorch stand-in for the CUDA kernel."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llm.model
from llm import ModelArgs, Transformer
from llm.chat import IGNORE_INDEX
from llm.model import document_mask, document_offsets, sdpa
from llm.sft_data import SFTCollator
from llm.tasks.lm import lm_loss

torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------- GQA
def repeated_sdpa(q, k, v, mask=None, is_causal=False):
    """The reference: K/V copied to every query head, then plain SDPA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


def gqa_inputs(T, S, H=8, n_kv=2, D=16, B=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k, v = (torch.randn(B, n_kv, S, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, T, S, generator=g) > 0.4
    mask[..., 0] = True  # no empty row
    return q, k, v, mask


CASES = {  # name: (T, S, mask slice or None, is_causal)
    "causal": (24, 24, None, True),
    "full-mask": (24, 24, ..., False),
    "key-mask": (24, 24, (slice(None), slice(None), slice(0, 1)), False),  # (B, 1, 1, S), broadcast over queries
    "decode-1": (1, 40, ..., False),  # one new token against a 40-slot cache
    "decode-3": (3, 40, ..., False),
}


@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("native", [True, False])
def test_gqa_equals_repeated_kv(monkeypatch, case, n_kv, native):
    monkeypatch.setattr(llm.model, "NATIVE_GQA", native)  # False: the repeat fallback (ROCm, torch 2.4)
    T, S, where, causal = CASES[case]
    q, k, v, mask = gqa_inputs(T, S, n_kv=n_kv)
    m = None if where is None else mask[where]
    ref = repeated_sdpa(q, k, v, m, causal)
    torch.testing.assert_close(sdpa(q, k, v, m, causal), ref, atol=1e-6, rtol=1e-5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    grads = torch.autograd.grad(sdpa(q, k, v, m, causal).square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(repeated_sdpa(q, k, v, m, causal).square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_runs_in_cpu_flash_kernel(dtype):
    """The CPU flash kernel takes grouped K/V itself, causal and masked, so nothing is repeated there."""
    assert llm.model.NATIVE_GQA
    q, k, v, mask = gqa_inputs(32, 32, dtype=dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-5)
    for m, causal in ((None, True), (mask, False)):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            y = sdpa(q, k, v, m, causal)
        torch.testing.assert_close(y, repeated_sdpa(q, k, v, m, causal), **tol)


# ----------------------------------------------------------------------------------------------- packed documents
def packed_batch(seed=0, T=64, B=3, vocab=256):
    """SFTCollator's packed batch of random examples (several per row, a padded tail, one row exactly full) and
    the example lengths per row."""
    g = torch.Generator().manual_seed(seed)
    rows = [[9, 20, 17], [30, 34], [5, 11, 7, 2, 39]]  # 46, 64 (full), 64 (full)
    items = []
    for lengths in rows[:B]:
        item = []
        for n in lengths:
            x = torch.randint(0, vocab, (n,), generator=g).tolist()
            y = [IGNORE_INDEX] * (n // 2) + torch.randint(0, vocab, (n - n // 2,), generator=g).tolist()
            item.append((x, y))
        items.append(item)
    return SFTCollator(pad_id=0, seq_len=T, packed=True)(items), rows[:B]


def test_collator_ships_document_indices_and_offsets_follow_them():
    batch, rows = packed_batch()
    doc = batch["mask"]
    assert doc.shape == (3, 64) and not doc.dtype.is_floating_point and doc.dtype != torch.bool
    for b, lengths in enumerate(rows):
        expected = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]
                             + [torch.full((64 - sum(lengths),), -1)])
        assert doc[b].tolist() == expected.tolist()
        assert batch["position_ids"][b, :sum(lengths)].tolist() == sum((list(range(n)) for n in lengths), [])
    # cu_seqlens: every example starts a run, the padding tail of row 0 is one more; row 1 starts at 64
    starts, p = [], 0
    for b, lengths in enumerate(rows):
        for n in lengths + ([64 - sum(lengths)] if sum(lengths) < 64 else []):
            starts.append(p)
            p += n
    assert document_offsets(doc).tolist() == starts + [3 * 64]
    assert document_offsets(doc).dtype == torch.int32
    # a row whose last run has the same index as the next row's first still ends there
    assert document_offsets(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 2]])).tolist() == [0, 2, 4, 7, 8]


def old_dense_mask(doc):
    """The (B, 1, T, T) mask SFTCollator built on the host before it shipped document indices."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_preset("debug", vocab_size=256, **kw))


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_document_indices_give_the_old_dense_mask_loss():
    batch, _ = packed_batch()
    assert torch.equal(document_mask(batch["mask"]), old_dense_mask(batch["mask"]))
    model = tiny_model()
    new = loss_and_grads(model, batch)
    old = loss_and_grads(model, {**batch, "mask": old_dense_mask(batch["mask"])})
    assert_same(new, old)
    # and the documents are really separated: without the mask the loss differs
    assert (lm_loss(model, {**batch, "mask": None}) - new[0]).abs() > 1e-4
    with pytest.raises(ValueError, match="without a KV cache"):
        model(batch["input_ids"], input_pos=torch.arange(64), mask=batch["mask"])


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """flash_attn_varlen_func's contract in plain PyTorch: q (N, H, D), k/v (N, n_kv, D), causal attention
    within each [cu[i], cu[i+1]) of the flattened tokens."""
    assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    bounds = cu_q.tolist()
    assert max_q >= max(b - a for a, b in zip(bounds, bounds[1:]))
    out = [repeated_sdpa(q[None, a:b].transpose(1, 2), k[None, a:b].transpose(1, 2), v[None, a:b].transpose(1, 2),
                         is_causal=True)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:]) if b > a]
    return torch.cat(out)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_branch_equals_the_mask(monkeypatch, checkpointing):
    """The flash-attn variable-length branch (CUDA), run on CPU with a PyTorch stand-in for the kernel: cu_seqlens
    reach every layer (through activation checkpointing too) and give the dense mask's loss and gradients; the
    S²-Attn hook stays off for packed batches, as with the mask."""
    from llm.longlora import enable_s2_attn

    batch, _ = packed_batch()
    model = tiny_model().train()
    model.gradient_checkpointing = checkpointing
    enable_s2_attn(model, 0.25)
    old = loss_and_grads(model, {**batch, "mask": old_dense_mask(batch["mask"])})
    calls = []
    monkeypatch.setattr(llm.model, "flash_attn_varlen_func", lambda *a, **kw: calls.append(1) or reference_varlen(
        *a, **kw))
    monkeypatch.setattr(llm.model, "flash_ok", lambda x: True)
    assert_same(loss_and_grads(model, batch), old)
    assert len(calls) >= model.args.n_layers
