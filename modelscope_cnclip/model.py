"""The Chinese CLIP network: an OpenAI-CLIP image tower and a transformers BERT text tower.

Parameter names equal the official checkpoints' (``visual.*``, ``bert.*``, ``text_projection``, ``logit_scale``),
so the official layout loads with no renaming; attention runs through ``F.scaled_dot_product_attention``.
Nothing here decides devices or precision: callers move and cast the module.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_cnclip.config import CLIPConfig, TextConfig, VisionConfig

__all__ = ['CLIP', 'VisionTransformer', 'ModifiedResNet', 'build_text_model']

PAD_ID = 0


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


MLP_CHUNK_ROWS = 256  # rows whose 4W-wide hidden activations stay in cache during the elementwise GELU


def _mlp_inference(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` without autograd, in row chunks, with the GELU computed in place.

    Same operations per element as the module (``h * sigmoid(1.702 * h)``), so results match it; the 4x wide
    hidden activations never leave the cache, which saves most of the GELU's memory traffic on CPUs.
    """
    fc, proj = mlp.c_fc, mlp.c_proj
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], proj.out_features, dtype=x.dtype, device=x.device)
    for start in range(0, flat.shape[0], MLP_CHUNK_ROWS):
        h = F.linear(flat[start:start + MLP_CHUNK_ROWS], fc.weight, fc.bias)
        h.mul_(torch.sigmoid(h * 1.702))
        out[start:start + MLP_CHUNK_ROWS] = F.linear(h, proj.weight, proj.bias)
    return out.view(*x.shape[:-1], proj.out_features)


def _tracing() -> bool:
    """Whether a graph is being traced (TorchScript, or an ONNX export; ``torch.onnx`` imported only if in use)."""
    if torch.jit.is_tracing():
        return True
    onnx = sys.modules.get('torch.onnx')
    return onnx is not None and onnx.is_in_onnx_export()


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names and fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Attend over all of ``x`` (B, L, W); with ``first_only`` only the first token's output is computed."""
        b, n, w = x.shape
        h, dh = self.heads, w // self.heads
        if first_only:
            q = F.linear(x[:, :1], self.in_proj_weight[:w], self.in_proj_bias[:w]).view(b, 1, h, dh).transpose(1, 2)
            kv = F.linear(x, self.in_proj_weight[w:], self.in_proj_bias[w:]).view(b, n, 2, h, dh)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, L, Dh)
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, h, dh)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, Lq, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], w))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, width * 4)), ('gelu', QuickGELU()), ('c_proj', nn.Linear(width * 4, width))]))

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """(B, L, W) -> (B, L, W), or (B, 1, W) for the first (class) token alone when ``first_only``."""
        x = (x[:, :1] if first_only else x) + self.attn(self.ln_1(x), first_only=first_only)
        y = self.ln_2(x)
        # The row-chunked path loops over a data-dependent count: a graph trace (ONNX export) must not bake it in.
        if (torch.is_grad_enabled() and (self.training or y.requires_grad)) or _tracing():
            return x + self.mlp(y)
        return x + _mlp_inference(self.mlp, y)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """(B, L, W) -> (B, L, W); with ``class_token_only`` the last block computes token 0 only: (B, 1, W)."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            first_only = class_token_only and i == last
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, first_only, use_reentrant=False)
            else:
                x = block(x, first_only=first_only)
        return x


class VisionTransformer(nn.Module):
    """conv1 (no bias) -> class token -> positional embedding -> ln_pre -> blocks -> ln_post(class) @ proj."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width, patch = cfg.width, cfg.patch_size
        assert patch is not None
        grid = cfg.image_size // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads)  # type: ignore[arg-type]
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        x = self.conv1(x)  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+g*g, W)
        if mask_ratio > 0:
            x = _keep_random_patches(x, mask_ratio)
        x = self.ln_pre(x)
        # Only the class token is read out, so the last block skips the other tokens' outputs (~7% of the work).
        x = self.transformer(x, class_token_only=True)
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, D)


def _keep_random_patches(x: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """FLIP masking: keep the class token and a random ``1 - mask_ratio`` share of the patches."""
    b, n, w = x.shape
    keep = max(1, int((n - 1) * (1.0 - mask_ratio)))
    idx = torch.rand(b, n - 1, device=x.device).argsort(dim=1)[:, :keep] + 1  # (B, keep)
    patches = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, w))
    return torch.cat([x[:, :1], patches], dim=1)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Anti-aliased strided convolution: an avgpool after the 3x3 conv instead of a stride.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ('-1', nn.AvgPool2d(stride)),
                ('0', nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ('1', nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token (plus positions) attends over all spatial tokens."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+HW, C)
        b, n, c = x.shape
        h = self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, h, c // h).transpose(1, 2)  # (B, H, 1, Dh)
        k = self.k_proj(x).view(b, n, h, c // h).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v_proj(x).view(b, n, h, c // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.c_proj(out)  # (B, D)


class ModifiedResNet(nn.Module):
    """OpenAI CLIP's ResNet: a 3-conv stem, anti-aliased strides and an attention pool instead of avgpool."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        layers = cfg.layers
        assert isinstance(layers, tuple)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        if mask_ratio > 0:
            raise ValueError('FLIP patch masking (mask_ratio > 0) needs a ViT image tower, not a ResNet')
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32W, R/32, R/32)
        return self.attnpool(x)


def build_text_model(cfg: TextConfig) -> nn.Module:
    """A transformers ``BertModel`` (no pooler: Chinese CLIP reads the [CLS] hidden state) with SDPA attention."""
    from transformers import BertConfig, BertModel

    bert_cfg = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps, pad_token_id=PAD_ID,
        attn_implementation='sdpa')
    return BertModel(bert_cfg, add_pooling_layer=False)


class CLIP(nn.Module):
    """Chinese CLIP. ``encode_image`` / ``encode_text`` return *unnormalised* features, as the official code does."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        tower = ModifiedResNet if cfg.vision.is_resnet else VisionTransformer
        self.visual = tower(cfg.vision, cfg.embed_dim)
        self.bert = build_text_model(cfg.text)
        self.text_projection = nn.Parameter(torch.empty(cfg.text.hidden_size, cfg.embed_dim))
        nn.init.normal_(self.text_projection, std=cfg.text.hidden_size ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def init_buffers(self) -> None:
        """Fill the non-persistent buffers (BERT's position and token-type ids) of a model built on ``meta``."""
        emb = self.bert.embeddings
        n = self.config.text.max_position_embeddings
        emb.register_buffer('position_ids', torch.arange(n).expand((1, -1)), persistent=False)
        emb.register_buffer('token_type_ids', torch.zeros(1, n, dtype=torch.long), persistent=False)
        leftover = [k for k, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        assert not leftover, f'tensors left on the meta device: {leftover[:5]}'

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``{"total", "visual", "text"}`` (the text tower with its projection)."""
        total = sum(p.numel() for p in self.parameters())
        visual = sum(p.numel() for p in self.visual.parameters())
        text = sum(p.numel() for p in self.bert.parameters()) + self.text_projection.numel()
        return {'total': total, 'visual': visual, 'text': text}

    def encode_image(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """``(B, 3, R, R)`` normalised pixels -> ``(B, D)`` image features."""
        return self.visual(pixel_values.to(self.visual.conv1.weight.dtype), mask_ratio=mask_ratio)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)`` token ids (``[PAD]=0``) -> ``(B, D)`` text features from the [CLS] hidden state."""
        if attention_mask is None:
            attention_mask = input_ids.ne(PAD_ID)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state  # (B, L, H)
        return hidden[:, 0, :] @ self.text_projection

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                mask_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training forward: L2-normalised image and text features and the logit scale ``exp(logit_scale)``."""
        img = F.normalize(self.encode_image(pixel_values, mask_ratio=mask_ratio), dim=-1)
        txt = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return img, txt, self.logit_scale.exp()

    def fingerprint(self) -> str:
        """A short hash that tells models apart: the config plus the projections, the logit scale and the first
        token embeddings, rounded to bf16 (finetuning changes them). :class:`~modelscope_cnclip.CNClip` takes it
        before any precision cast, so one checkpoint has one fingerprint at every precision. Embedding files and
        indexes record it, to refuse mixing models."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        visual = self.visual
        final = visual.proj if isinstance(visual, VisionTransformer) else visual.attnpool.c_proj.weight
        words = self.bert.embeddings.word_embeddings.weight[:256]
        for t in (self.text_projection, self.logit_scale, final, words):
            h.update(t.detach().to('cpu', torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable
        if enable:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        else:
            self.bert.gradient_checkpointing_disable()
