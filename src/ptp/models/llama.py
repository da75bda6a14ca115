"""One decoder for the Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Plain single-device PyTorch: the tensor-parallel split lives in `tp_plan` below and is applied
from outside. Under tensor parallelism the projections return this rank's heads only, so head
counts are read off the tensors, never off the config. Row-parallel outputs are partial sums
that `all_reduce` completes (a no-op on one device).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptp.config import ModelConfig
from ptp import ops
from ptp.ops import Linear
from ptp.parallel.comm import all_reduce


class RMSNorm(nn.Module):
    """RMSNorm; given a residual, adds it first and returns (normed, new residual): one fused kernel
    under torch.compile."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if ops.norm_kernel_ok(x, self.weight):  # a batch-1 decode step on the GPU (ops.py)
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            return ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class Rotary(nn.Module):
    """cos/sin for every position up to max_positions, looked up by position (rotate-half layout)."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config, self.max_positions = config, max_positions
        self.register_buffer("cos_sin", torch.empty(max_positions, config.head_dim), persistent=False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        inv_freq = rope_inv_freq(self.config)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(self.cos_sin.device)

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """q, k and v come from one projection (`qkv_proj`, merged at load time from q/k/v_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        hd = config.head_dim
        self.layer_idx, self.head_dim = layer_idx, hd
        self.num_heads, self.num_kv_heads = config.num_heads, num_kv_heads
        self.qkv_proj = Linear(config.hidden_size, (config.num_heads + 2 * num_kv_heads) * hd, bias=config.qkv_bias)
        self.o_proj = Linear(config.num_heads * hd, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, positions, rotary, attn, layer_idx=None):
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # this rank's share keeps the model's q : k : v proportions
        q_size = qkv.shape[-1] * self.num_heads // (self.num_heads + 2 * self.num_kv_heads)
        kv_size = (qkv.shape[-1] - q_size) // 2
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, -1, self.head_dim)
        k = k.reshape(tokens, -1, self.head_dim)
        v = v.reshape(tokens, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        layer_idx = self.layer_idx if layer_idx is None else layer_idx
        out = attn(layer_idx, q, k, v, rotary, positions)  # RoPE there: some kernels fuse it
        return all_reduce(self.o_proj(out.reshape(tokens, -1)))


class MLP(nn.Module):
    """SwiGLU; gate and up come from one projection (`gate_up_proj`, merged at load time).

    reduce=False leaves the row-parallel partial sum to the caller (a MoE layer's shared expert
    joins the experts' partial sums in one all-reduce)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None, reduce: bool = True):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * width, bias=False)
        self.down_proj = Linear(width, config.hidden_size, bias=False)
        self.reduce = reduce

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        out = self.down_proj(F.silu(gate) * up)  # one fused kernel for the activation, compiled
        return all_reduce(out) if self.reduce else out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, num_kv_heads: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, num_kv_heads)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, positions, rotary, attn, layer_idx=None):
        """layer_idx: which KV cache to use, given as an argument by the compiled prefill (one compiled
        function for every layer, to which an int attribute would be a constant)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rotary, attn, layer_idx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LayerElsewhere(nn.Module):
    """The place of a decoder layer that another pipeline stage holds (parameter names keep the
    checkpoint's layer numbers)."""

    def forward(self, *args):
        raise RuntimeError("this decoder layer is held by another pipeline stage")


class LlamaModel(nn.Module):
    """The decoder stack. A pipeline stage runs `layer_range` only (see LlamaForCausalLM.keep_stage):
    it takes the previous stage's (hidden, residual) instead of embedding tokens, and a stage before
    the last returns them instead of the normed hidden state."""

    def __init__(self, config: ModelConfig, num_kv_heads: int, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, num_kv_heads) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config, max_positions)
        self.layer_range = range(config.num_layers)

    def forward(self, input_ids, positions, attn, run_layer=None, hidden=None):
        """run_layer(layer, x, residual, positions, rotary, attn, index), given, runs each layer (the
        runner's compiled prefill passes one compiled function that every layer goes through). Each
        layer is given its index in this stage's KV cache."""
        if hidden is None:
            x, residual = self.embed_tokens(input_ids), None
            if run_layer is not None:
                residual = torch.zeros_like(x)  # x + 0 is x: the first layer compiles as the others do
        else:
            x, residual = hidden
        for i in range(len(self.layer_range)):
            layer = self.layers[self.layer_range.start + i]
            if run_layer is None:
                x, residual = layer(x, residual, positions, self.rotary, attn, i)
            else:
                x, residual = run_layer(layer, x, residual, positions, self.rotary, attn, i)
        if self.norm is None:
            return x, residual
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """`forward` maps a flat batch of tokens to hidden states; `logits` maps chosen rows to vocab.

    num_kv_heads may exceed the checkpoint's when tensor parallelism replicates KV heads so that
    every rank holds whole heads (see parallel/plans.py).
    """

    def __init__(self, config: ModelConfig, num_kv_heads: int | None = None, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, num_kv_heads or config.num_kv_heads,
                                max_positions or config.max_position_embeddings)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        if self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def keep_stage(self, layers: range, first: bool, last: bool) -> None:
        """Keep only what one pipeline stage runs: `layers`, the embedding on the first stage, the final
        norm and lm_head on the last (a tied lm_head stays, loaded from the embedding). Called on the
        meta device, before any weight is loaded."""
        for i in range(len(self.model.layers)):
            if i not in layers:
                self.model.layers[i] = LayerElsewhere()
        self.model.layer_range = layers
        if not first:
            self.model.embed_tokens = None
        if not last:
            self.model.norm = self.lm_head = None

    def forward(self, input_ids, positions, attn, run_layer=None, hidden=None):
        return self.model(input_ids, positions, attn, run_layer, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the vocabulary under tensor parallelism; all of it on one device."""
        return self.lm_head(hidden)


# Checkpoint tensors that the merged projections are built from, in order.
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def tp_plan(config: ModelConfig) -> dict:
    """How each submodule is split across the tensor-parallel ranks (torch.distributed.tensor.parallel)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    def partial_rowwise():
        return RowwiseParallel(output_layouts=Partial(), use_local_output=True)

    layer = "model.layers.*."
    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # merged projections: each rank's rows are its own q|k|v (gate|up) slices, side by side
        layer + "self_attn.qkv_proj": ColwiseParallel(),
        layer + "self_attn.o_proj": partial_rowwise(),
        layer + "mlp.gate_up_proj": ColwiseParallel(),
        layer + "mlp.down_proj": partial_rowwise(),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=True),
    }
