"""LongLoRA: S²-Attn against full attention, a naive shift-and-group reference and the earlier 5-D masked
implementation; RoPE extension; which parameters LongLoRA trains."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm import ModelArgs, Transformer
from llm.errors import UserError
from llm.longlora import enable_s2_attn, extend_context, s2_attention


def naive_s2_attention(q, k, v, group: int):
    """The paper's picture, one head at a time with an explicit (T, T) mask: head h < H/2 attends causally
    within blocks [0, g), [g, 2g), ...; head h >= H/2 within blocks shifted by g/2 ([0, g/2), [g/2, 3g/2), ...)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    i = torch.arange(T)
    out = []
    for h in range(H):
        shift = group // 2 if h >= H // 2 else 0
        block = (i + shift) // group
        mask = (block[:, None] == block[None, :]) & (i[None, :] <= i[:, None])
        out.append(F.scaled_dot_product_attention(q[:, h], k[:, h // rep], v[:, h // rep], attn_mask=mask))
    return torch.stack(out, dim=1)


def s2_attention_5d(q, k, v, group_size_ratio: float = 0.25):
    """The implementation before the 4-D rewrite (commit ff8693f), kept as a reference: K/V repeated to every
    head, each half padded (the shifted one with g/2 slots in front), viewed as (B, h, n_groups, g, D) and attended
    under an explicit (n, g, g) mask in which the front padding forms its own block."""
    B, H, T, D = q.shape
    group = max(2, int(T * group_size_ratio))
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if group >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def grouped_causal(x_q, x_k, x_v, front):
        h = x_q.shape[1]
        n = -(-(T + front) // group)
        back = n * group - T - front

        def fold(x):
            return F.pad(x, (0, 0, front, back)).view(B, h, n, group, D)

        i = torch.arange(group)
        mask = (i[None, :] <= i[:, None]).expand(n, group, group).clone()
        pad = i < front
        mask[0] &= ~(pad[:, None] ^ pad[None, :])
        y = F.scaled_dot_product_attention(fold(x_q), fold(x_k), fold(x_v), attn_mask=mask)
        return y.reshape(B, h, n * group, D)[:, :, front:front + T]

    half = H // 2
    return torch.cat([grouped_causal(q[:, :half], k[:, :half], v[:, :half], 0),
                      grouped_causal(q[:, half:], k[:, half:], v[:, half:], group // 2)], dim=1)


def qkv(T, H=4, n_kv=2, D=8, seed=0, B=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, T, D, generator=g).to(dtype) for h in (H, n_kv, n_kv))


def fwd_bwd(fn, q, k, v, *args):
    """fn's output and the gradients of q, k, v under a fixed random upstream gradient."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    y = fn(q, k, v, *args)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return y.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("T,ratio", [(32, 0.25), (33, 0.25), (20, 0.25), (21, 0.25), (24, 0.5), (30, 0.2),
                                     (31, 0.1), (64, 0.125), (10, 0.3)])
@pytest.mark.parametrize("H,n_kv", [(4, 4), (4, 2), (8, 2), (4, 1), (6, 3), (8, 1)])
def test_4d_equals_the_5d_masked_implementation_forward_and_backward(T, ratio, H, n_kv):
    q, k, v = qkv(T, H, n_kv)
    for new, old in zip(fwd_bwd(s2_attention, q, k, v, ratio), fwd_bwd(s2_attention_5d, q, k, v, ratio)):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2_attention(q, k, v, ratio), naive_s2_attention(q, k, v, max(2, int(T * ratio))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_alone_suffices_when_groups_tile_the_sequence(dtype):
    """T divisible by g: every call is plain causal attention on 4-D tensors, which CPU's flash kernel takes
    (forward and backward); the 5-D masked reference needs the math path and fails under flash alone."""
    q, k, v = qkv(64, H=8, n_kv=2, D=16, dtype=dtype)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fused = fwd_bwd(s2_attention, q, k, v, 0.25)
        with pytest.raises(RuntimeError):
            s2_attention_5d(q, k, v, 0.25)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    for a, b in zip(fused, fwd_bwd(s2_attention_5d, q, k, v, 0.25)):
        torch.testing.assert_close(a, b, **tol)


def test_one_group_is_full_attention():
    q, k, v = qkv(T=16)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(s2_attention(q, k, v, group_size_ratio=1.0), full)


@pytest.mark.parametrize("T,ratio", [(32, 0.25), (20, 0.25), (24, 0.5), (30, 0.2), (21, 0.25)])
def test_groups_match_naive_reference(T, ratio):
    q, k, v = qkv(T)
    group = max(2, int(T * ratio))
    torch.testing.assert_close(s2_attention(q, k, v, ratio), naive_s2_attention(q, k, v, group))
    # and it really is sparse: differs from full attention
    full = naive_s2_attention(q, k, v, T)
    assert (s2_attention(q, k, v, ratio) - full).abs().max() > 1e-2


def test_s2_attn_only_in_training_and_gradients_flow():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("debug"))
    x = torch.randint(0, 512, (2, 32))
    model.eval()
    full = model(x)
    enable_s2_attn(model, 0.25)
    torch.testing.assert_close(model(x), full)  # inference keeps full attention
    model.train()
    sparse = model(x)
    assert (sparse - full).abs().max() > 1e-4
    # the first group is attended exactly as under full attention by the unshifted heads, but the shifted heads
    # see only half a group there: positions before g/2 still agree with full attention
    torch.testing.assert_close(sparse[:, :4], full[:, :4])
    sparse.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_extend_context_writes_rope_scaling(tmp_path):
    from llm.hf_format import load_model, read_config, save_model

    model = Transformer(ModelArgs.from_preset("debug", max_seq_len=64))
    extend_context(model, 4, "yarn")
    assert model.args.max_seq_len == 256 and model.rope_cos.shape[0] == 256
    save_model(model, tmp_path / "m")
    args, cfg = read_config(tmp_path / "m")
    assert cfg["max_position_embeddings"] == 256
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["rope_scaling"]["original_max_position_embeddings"] == 64
    # transformers reads the same YaRN tables from the saved config
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 512, (1, 200))
    torch.testing.assert_close(load_model(tmp_path / "m")(x), ref(x).logits, atol=2e-5, rtol=1e-4)
    with pytest.raises(UserError, match="already has rope_scaling"):
        extend_context(model, 2)
