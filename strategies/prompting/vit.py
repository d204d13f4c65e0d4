"""Running a timm Vision Transformer with prompts, on timm's own modules.

Prompt methods change two things in a ViT: prompt tokens inserted into the
sequence (prompt tuning, L2P) and prefix keys and values prepended to the
attention of some blocks (prefix tuning, DualPrompt and CODA-Prompt; Li and
Liang 2021). Both are done here by calling the submodules of timm's
`VisionTransformer` and `Block` (patch embedding, position embedding, the
block's norms, qkv and projection, MLP, layer scale, drop path) in the order
timm's own `forward` calls them, so any timm ViT with standard blocks works
and its pre-trained weights mean what they meant. No ViT is forked: two short
functions repeat timm's `Attention.forward` and `Block.forward` with the prefix
added (a test checks that without a prefix they equal timm's own). Prefix keys
are free parameters: a ViT with `qk_norm` normalises its own keys, not them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Prefix = tuple[torch.Tensor, torch.Tensor]  # keys (B, L, D), values (B, L, D)


def check_vit(model: nn.Module) -> None:
    """Refuse a model the prompt methods cannot run: not a timm ViT, or blocks other than
    timm's standard pre-norm `Block` with its `Attention`."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"prompt methods need a timm VisionTransformer (e.g. vit_tiny_patch16_224), "
                        f"not {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise TypeError(f"block {i} of the ViT is a {type(block).__name__} with "
                            f"{type(getattr(block, 'attn', None)).__name__}: prompts need timm's standard "
                            f"Block and Attention")


def embed_tokens(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The token sequence before the first block: patches, class token, position embedding."""
    h = vit.patch_embed(x)
    h = vit._pos_embed(h)
    h = vit.patch_drop(h)
    return vit.norm_pre(h)


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads): each head gets its own slice of the width.
    A permute, not a reshape of (B, L, D) into (B, heads, L, .), which would mix tokens
    across heads (the mistake of a widely used port of DualPrompt)."""
    B, L, D = t.shape
    return t.view(B, L, n_heads, D // n_heads).transpose(1, 2)


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """timm `Attention` over `x` with `prefix` keys and values prepended to each head's own
    (prefix tuning): queries come from `x` only, so the sequence keeps its length."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        pk, pv = prefix
        k = torch.cat([split_heads(pk, attn.num_heads), k], dim=2)
        v = torch.cat([split_heads(pv, attn.num_heads), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def block_forward(block: nn.Module, h: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
    """timm's pre-norm `Block.forward`, with prefix keys and values in its attention."""
    if prefix is None:
        return block(h)
    h = h + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(h), prefix)))
    return h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))


def prompted_tokens(vit: nn.Module, x: torch.Tensor, prefixes: dict[int, Prefix] | None = None,
                    prompt: torch.Tensor | None = None) -> torch.Tensor:
    """The ViT's final (normalised) token sequence on images `x`, with `prompt` tokens
    (B, P, D) inserted right after the class (and register) tokens, and `prefixes[i]`
    prepended to the keys and values of block i. The prompt tokens take no position
    embedding: they have no place in the image."""
    h = embed_tokens(vit, x)
    if prompt is not None:
        n = vit.num_prefix_tokens
        h = torch.cat([h[:, :n], prompt, h[:, n:]], dim=1)
    prefixes = prefixes or {}
    for i, block in enumerate(vit.blocks):
        h = block_forward(block, h, prefixes.get(i))
    return vit.norm(h)


def classify(vit: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The ViT's own classifier (fc_norm, dropout, head) on pooled tokens."""
    return vit.head(vit.head_drop(vit.fc_norm(pooled)))


@torch.no_grad()
def frozen_query(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The query of the prompt methods: the pre-logit class feature of the frozen ViT
    without any prompt, in eval mode (no dropout), without gradient."""
    modes = [(m, m.training) for m in vit.modules()]
    vit.eval()
    try:
        return vit.forward_head(vit.forward_features(x), pre_logits=True)
    finally:
        for m, mode in modes:
            m.training = mode


def tokens_through(vit: nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """The ViT's token sequence on images `x` after blocks 0..`block` (inclusive), without
    any prompt and before the final norm: what an intermediate block outputs."""
    h = embed_tokens(vit, x)
    for blk in vit.blocks[:block + 1]:
        h = blk(h)
    return h


def tokens_from(vit: nn.Module, h: torch.Tensor, block: int, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Continue from `h`, the output of block `block`: `prompt` tokens (B, P, D) inserted right
    after the class (and register) tokens, then blocks `block`+1.. and the final norm. With
    `tokens_through`, `tokens_from(vit, tokens_through(vit, x, m), m)` is the plain ViT."""
    if prompt is not None:
        n = vit.num_prefix_tokens
        h = torch.cat([h[:, :n], prompt, h[:, n:]], dim=1)
    for blk in vit.blocks[block + 1:]:
        h = blk(h)
    return vit.norm(h)
