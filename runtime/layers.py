"""Small building blocks shared by the model: RMSNorms, interleaved partial RoPE, mHC mixing.

Shape letters used across the runtime: B batch, S new tokens in this call, T keys, H heads,
D hidden size, d head_dim, r rope dims, n hc_mult streams, N compressed entries, K top-k.
Numerics follow transformers 5.24 `deepseek_v4` (the reference for logits): norms compute in fp32
and cast back once, RoPE rotates in fp32 with cos/sin rounded to the activation dtype, mHC
weights are fp32 and the stream combine runs in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    """Weighted RMSNorm: fp32 statistics and weight multiply, one cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-vector RMSNorm without weight (q heads, mHC input); the factor is cast to x's dtype first."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE: interleaved pairs (2i, 2i+1) on the trailing r channels; "main" flavour (rope_theta) on
# sliding-only layers, "compress" flavour (compress_rope_theta + YaRN, no mscale) on CSA/HCA layers.

def rope_inv_freq(cfg: ModelConfig, compress: bool, dim: int | None = None) -> torch.Tensor:
    r = dim or cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compress else cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    inv = 1.0 / pos_freqs
    ramp_range = cfg.yarn_ramp_range() if compress else None
    if ramp_range is None:
        return inv
    low, high = ramp_range
    ramp = ((torch.arange(r // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency, 0 takes the interpolated one
    return (1.0 / (cfg.rope_scaling["factor"] * pos_freqs)) * (1 - extrapolation) + inv * extrapolation


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin of shape [..., r/2] for integer positions [...]; angles in fp32, rounded to dtype like HF."""
    ang = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] channels of x (pairs interleaved). cos/sin broadcast as [..., S, 1?, r/2]."""
    r = cos.shape[-1] * 2
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.float().unflatten(-1, (-1, 2))  # [..., r/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos.float(), sin.float()
    rot = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([nope, rot], dim=-1)


# ---------------------------------------------------------------------------------------------
# Manifold-constrained hyper-connections (mHC): n residual streams mixed per token per sub-layer.

def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               n: int, iters: int, eps: float, norm_eps: float):
    """Returns (pre [B,S,n], post [B,S,n], comb [B,S,n,n]) from streams [B,S,n,D], all fp32."""
    B, S = streams.shape[:2]
    flat = unweighted_rms_norm(streams.reshape(B, S, -1).float(), norm_eps)
    mix = F.linear(flat, fn.float())  # [B, S, (2+n)*n]
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.float().split([n, n, n * n])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.view(B, S, n, n) * s[2] + comb_b.view(n, n), dim=-1) + eps
    # Sinkhorn towards a doubly-stochastic mixing matrix, on an [n(j), n(k), B, S] layout: the
    # reductions then run over the outer axes, ~15x faster than over size-n inner axes.
    m = comb.permute(2, 3, 0, 1).contiguous()
    m = m / (m.sum(0, keepdim=True) + eps)  # columns (sum over j)
    for _ in range(iters - 1):
        m = m / (m.sum(1, keepdim=True) + eps)  # rows (sum over k)
        m = m / (m.sum(0, keepdim=True) + eps)
    return pre, post, m.permute(2, 3, 0, 1)


def hc_collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the n streams -> [B,S,D] in the streams' dtype."""
    # n fused multiply-adds: ~2x faster than a broadcast product and a reduction over the size-n axis
    pre = pre.to(streams.dtype)
    out = streams[:, :, 0] * pre[..., 0:1]
    for j in range(1, streams.shape[2]):
        out.addcmul_(streams[:, :, j], pre[..., j:j + 1])
    return out


def hc_expand(streams: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams: out[k] = post[k] * y + sum_j comb[j, k] * streams[j] (comb applied transposed)."""
    dt = streams.dtype
    post, comb = post.to(dt), comb.to(dt)
    # n fused multiply-adds over [B,S,n,D]: ~5x faster on CPU than a batch of S tiny n x n matmuls
    out = torch.addcmul(comb[..., 0, :].unsqueeze(-1) * streams[:, :, 0:1], post.unsqueeze(-1), y.unsqueeze(-2))
    for j in range(1, streams.shape[2]):
        out.addcmul_(comb[..., j, :].unsqueeze(-1), streams[:, :, j:j + 1])
    return out
