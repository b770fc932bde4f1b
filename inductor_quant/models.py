"""A small built-in Llama-style decoder with seeded random weights (no downloads).

It is the model the ``inductor-quant demo`` quantizes and compiles, the model the tests and the
graph-inspection tool run, and a quick way to try the library on something transformer-shaped.
The architecture is Llama's: token embedding, ``n_layers`` pre-norm blocks of RMSNorm →
grouped-query attention with rotary position embeddings → RMSNorm → SwiGLU MLP, a final RMSNorm
and an untied ``lm_head``. Module names follow Hugging Face's ``LlamaForCausalLM``
(``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``, ``lm_head``...), so skip lists
written for real checkpoints work unchanged.

``forward(tokens)`` runs a full causal pass. ``generate`` uses a static KV cache
(``setup_caches``), so the decode step always sees the same shapes and compiles once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyLlamaConfig", "TinyLlama", "RMSNorm", "Attention", "MLP", "Block", "KVCache", "build_model", "grouped_query_attention"]


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Sizes of the built-in model.

    ``n_kv_heads`` defaults to ``n_heads`` (plain multi-head attention); a divisor of ``n_heads``
    gives grouped-query attention. ``hidden_dim`` defaults to Llama's rule:
    ``multiple_of``-rounded ``8/3 * dim``.
    """

    dim: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 1024
    hidden_dim: int | None = None
    multiple_of: int = 64
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"dim / n_heads must be even for rotary embeddings, got head_dim={self.head_dim}")
        if self.n_heads % self.kv_heads != 0:
            raise ValueError(f"n_kv_heads ({self.kv_heads}) must divide n_heads ({self.n_heads})")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {self.hidden_dim!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalized in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of shape ``(max_seq_len, head_dim // 2)`` for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, H, T, D)`` by position; ``cos``/``sin`` are ``(T, D // 2)``.

    Pairs are (first half, second half) of the head dimension (Hugging Face's layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of ``q (B, H, T, D)`` over ``k, v (B, H_kv, S, D)`` with ``H_kv`` dividing ``H``
    (query head ``h`` reads key/value head ``h // (H / H_kv)``); ``mask (T, S)`` is True where a
    query may attend, or an additive float bias (0 or -inf).

    The ``H / H_kv`` query heads of a group become rows of one query matrix per key/value head, so
    the keys and values are read in place: expanding them to ``H`` heads would copy the whole static
    cache every decode step, and the backends that take a mask do not all take ``enable_gqa``."""
    batch, heads, seq, head_dim = q.shape
    groups = heads // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(batch, k.shape[1], groups * seq, head_dim)  # row r * T + t: head kv * groups + r, query t
    # a single query row is broadcast to the group (a view); several are repeated (a copy)
    mask = mask.expand(groups, -1) if seq == 1 else mask.repeat(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, heads, seq, head_dim)


class KVCache(nn.Module):
    """Static ``(B, kv_heads, max_seq_len, head_dim)`` key/value buffers, written at ``input_pos``."""

    def __init__(self, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings and an optional static KV cache."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads)
        else:
            out = grouped_query_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyLlama(nn.Module):
    """The built-in Llama-style decoder (see the module docstring)."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_batch_size = 0

    def setup_caches(self, batch_size: int) -> None:
        """Static KV caches for ``batch_size`` sequences of up to ``max_seq_len`` tokens.

        Caches of the right size, dtype and device are zeroed in place rather than replaced: a
        compiled model guards on its buffers, and new cache tensors would force a recompile."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dtype = self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        shape = (batch_size, self.config.kv_heads, self.config.max_seq_len, self.config.head_dim)
        for layer in self.layers:
            cache = layer.self_attn.kv_cache
            if cache is not None and cache.k_cache.shape == shape and cache.k_cache.dtype == dtype and cache.k_cache.device == device:
                cache.k_cache.zero_()
                cache.v_cache.zero_()
            else:
                layer.self_attn.kv_cache = KVCache(batch_size, self.config.kv_heads, self.config.max_seq_len, self.config.head_dim, dtype, device)
        self.cache_batch_size = batch_size

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for ``tokens`` ``(B, T)``.

        Without ``input_pos``: a full causal pass (no cache). With ``input_pos`` (``(T,)`` positions
        of ``tokens``): keys/values are written to the KV cache (``setup_caches`` first) and every
        query attends to the cached positions up to its own.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        x = self.embed_tokens(tokens)
        if input_pos is None:
            seq = tokens.shape[1]
            cos, sin, mask = self.rope_cos[:seq], self.rope_sin[:seq], None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            positions = torch.arange(self.config.max_seq_len, device=tokens.device)
            # one additive bias for every layer (a boolean mask is turned into one by each attention call)
            visible = positions[None, :] <= input_pos[:, None]
            mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, n: int, step_fn=None) -> torch.Tensor:
        """Greedy decoding: append ``n`` tokens to ``tokens`` ``(B, T)`` and return ``(B, T + n)``.

        Runs one prefill over the prompt and ``n - 1`` single-token decode steps through the static
        KV cache. ``step_fn(tokens, input_pos) -> logits`` replaces ``self`` for every forward
        (pass a compiled version of the model there; it must share this module's caches).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        total = tokens.shape[1] + n
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt length + n ({total}) exceeds max_seq_len ({self.config.max_seq_len})")
        if n == 0:
            return tokens.clone()
        if self.cache_batch_size != tokens.shape[0]:
            self.setup_caches(tokens.shape[0])
        forward = self if step_fn is None else step_fn
        out = torch.empty(tokens.shape[0], total, dtype=tokens.dtype, device=tokens.device)
        out[:, : tokens.shape[1]] = tokens
        input_pos = torch.arange(tokens.shape[1], device=tokens.device)
        logits = forward(tokens, input_pos)
        for i in range(tokens.shape[1], total):
            next_token = logits[:, -1].argmax(dim=-1)
            out[:, i] = next_token
            if i + 1 < total:
                input_pos = torch.tensor([i], device=tokens.device)
                logits = forward(next_token[:, None], input_pos)
        return out


def _init_weights(model: TinyLlama, generator: torch.Generator) -> None:
    """Seeded init: linears ~ N(0, 1/fan_in) (unit-gain activations), embeddings ~ N(0, 1)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.normal_(0.0, 1.0 / math.sqrt(module.in_features), generator=generator)
        elif isinstance(module, nn.Embedding):
            with torch.no_grad():
                module.weight.normal_(0.0, 1.0, generator=generator)


def build_model(
    config: TinyLlamaConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TinyLlama:
    """A :class:`TinyLlama` with weights drawn from ``torch.Generator().manual_seed(seed)``.

    The weights depend only on ``config`` and ``seed`` (initialized in fp32 on the CPU, then cast
    and moved), so every device and dtype sees the same model, and the global RNG is untouched.
    """
    config = TinyLlamaConfig() if config is None else config
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        model = TinyLlama(config)
    _init_weights(model, torch.Generator().manual_seed(seed))
    model = model.to(device=device, dtype=dtype).eval()
    model.rope_cos = model.rope_cos.float()
    model.rope_sin = model.rope_sin.float()
    return model
