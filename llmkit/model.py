"""The transformer: one file, every variant a field of `ModelConfig`.

Module names follow Hugging Face's Llama (`model.layers.0.self_attn.q_proj.weight`, ...), so
Llama/Mistral/Qwen2 checkpoints load with no rename table; GPT-2 is mapped in checkpoint.py.

Shapes: B batch, T query length, S key length, C d_model, H heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmkit.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight  # read once: parameter lookups go through nn.Module.__getattr__ (slow in a decode step)
        if x.dtype == w.dtype == torch.float32:
            # the same ops as below in one C++ call, bit for bit in fp32: a norm costs ~10us instead of ~14
            return torch.rms_norm(x, w.shape, w, self.eps)
        # statistics in fp32 even under bf16: the mean of squares underflows otherwise
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_dropout(p: float) -> nn.Module:
    # nn.Dropout(0) still costs a module call and an op per use (~3us, twice a layer): too much in decoding
    return nn.Dropout(p) if p > 0 else nn.Identity()


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)


# ----------------------------------------------------------------------------- positions


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (fp32, [rope_dim/2]) and the cos/sin scale, per the configured scaling."""
    dim, theta, factor = config.rope_dim, config.rope_theta, config.rope_factor
    if config.rope_scaling == "ntk":
        # NTK-aware: stretch the base so low frequencies interpolate and high ones extrapolate
        theta = theta * factor ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (theta**exponents)
    scale = 1.0
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / factor
    elif config.rope_scaling == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, config)
    elif config.rope_scaling == "yarn":
        inv_freq, scale = _yarn_inv_freq(theta, config)
    return inv_freq, scale


def _llama3_inv_freq(inv_freq: Tensor, config: ModelConfig) -> Tensor:
    old_len, factor = config.rope_original_max_seq_len, config.rope_factor
    low_wavelen = old_len / config.llama3_low_freq_factor
    high_wavelen = old_len / config.llama3_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    # between the two wavelengths, blend interpolated and original frequencies smoothly
    smooth = (old_len / wavelen - config.llama3_low_freq_factor) / (
        config.llama3_high_freq_factor - config.llama3_low_freq_factor
    )
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(theta: float, config: ModelConfig) -> tuple[Tensor, float]:
    dim, factor, old_len = config.rope_dim, config.rope_factor, config.rope_original_max_seq_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(config.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.yarn_beta_slow)), dim - 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / max(high - low, 1e-3)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency ones (interpolated)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, scale


def signed_sin(sin: Tensor) -> Tensor:
    """sin [..., R] with its first half negated: the table `apply_rope` takes."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [B,H,T,D]; cos and `signed_sin(sin)` [B,1,T,R], R <= D (partial rotary leaves x[..., R:] unrotated).

    The usual x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1), bit for bit:
    x.roll(R/2) is cat(x2, x1) and the sign lives in the table (negating a factor is exact).
    4 ops a call instead of 6, twice a layer in every decode step.
    """
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + x.roll(R // 2, -1) * sin_signed
    rot, rest = x[..., :R], x[..., R:]
    return torch.cat((rot * cos + rot.roll(R // 2, -1) * sin_signed, rest), dim=-1)


def alibi_slopes(n_head: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al.); non-powers of two interleave the next power's slopes."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest < n_head:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")


# ----------------------------------------------------------------------------- attention


class KVCache(nn.Module):
    """Pre-allocated keys/values [B,K,L,D]; fixed shapes so a decode step can be compiled/CUDA-graphed."""

    def __init__(self, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, H, K, D = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = H, K, D
        self.dropout = config.attn_dropout
        self.scale = config.attn_scale  # None: SDPA's 1/sqrt(D)
        self.q_proj = nn.Linear(C, H * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, K * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, K * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attn_out_bias)
        self.kv_cache: KVCache | None = None
        self.layer_idx = 0  # position in the stack (set by Backbone): picks this layer's prefix_kv entry
        # (weight, bias) of q, k and v stacked while a KV cache is set up (see STACK_MAX_NUMEL); None otherwise
        self.qkv_stacked: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor, ctx: "ForwardContext") -> Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_stacked is not None:
            qkv = F.linear(x, *self.qkv_stacked).view(B, T, H + 2 * K, D).transpose(1, 2)
            qk, v = qkv[:, : H + K], qkv[:, H + K :]
            if ctx.cos is not None:  # q and k are adjacent heads here, so they rotate in one go: half the ops
                qk = apply_rope(qk, ctx.cos, ctx.sin)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
            if ctx.cos is not None:
                q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        cache = self.kv_cache
        if cache is not None and ctx.slots is not None:
            k, v = cache.update(ctx.slots, k, v)
            if ctx.kv_len is not None:  # eager decoding reads only the filled part of the cache
                k, v = k[:, :, : ctx.kv_len], v[:, :, : ctx.kv_len]
        if ctx.prefix_kv is not None:  # prefix tuning: P learned keys/values [B,K,P,D] before the sequence's own
            pk, pv = ctx.prefix_kv[self.layer_idx]
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=ctx.mask,
            is_causal=ctx.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
            scale=self.scale,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _gelu_tanh(t: Tensor) -> Tensor:
    return F.gelu(t, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, d_ff: int | None = None):
        super().__init__()
        C, Fd, bias = config.d_model, d_ff or config.d_ff, config.mlp_bias  # d_ff: an expert's own width
        self.gated = config.gated
        if self.gated:
            self.gate_proj = nn.Linear(C, Fd, bias=bias)
        self.up_proj = nn.Linear(C, Fd, bias=bias)
        self.down_proj = nn.Linear(Fd, C, bias=bias)
        self.act = {
            "swiglu": F.silu, "silu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu,
            "gelu_tanh": _gelu_tanh, "geglu_tanh": _gelu_tanh,
        }[config.activation]
        # (weight, bias) of gate and up stacked while a KV cache is set up (see STACK_MAX_NUMEL); None otherwise
        self.gate_up_stacked: tuple[Tensor, Tensor | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_stacked is not None:
            gate, up = F.linear(x, *self.gate_up_stacked).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Experts(nn.ModuleList):
    """The routed experts of one MoE layer (HF's names: `mlp.experts.{e}.gate_proj`, ...).

    forward(xs, counts): xs holds counts[e] rows for expert e, expert after expert; returns their outputs
    in the same order. Expert parallelism swaps this module for one that dispatches rows to other ranks.
    """

    def forward(self, xs: Tensor, counts: list[int]) -> Tensor:
        return run_experts(list(self), xs, counts)


def run_experts(experts: list[nn.Module], xs: Tensor, counts: list[int]) -> Tensor:
    """Expert i on the next counts[i] rows of xs, for each i in turn; outputs in the same order."""
    # experts without rows are skipped: they add no rows, and under autocast an empty fp32 input among
    # bf16 outputs would promote the whole concatenation to fp32
    outs = [expert(chunk) for expert, chunk in zip(experts, xs.split(counts), strict=True) if len(chunk)]
    return torch.cat(outs) if outs else xs


class Routing:
    """One MoE forward's assignments, sorted by expert: kept rows' tokens and weights, per-expert counts."""

    __slots__ = ("tokens", "weights", "kept", "routed", "probs", "logits")

    def __init__(self, tokens: Tensor, weights: Tensor, kept: Tensor, routed: Tensor, probs: Tensor, logits: Tensor):
        self.tokens, self.weights, self.kept, self.routed = tokens, weights, kept, routed
        self.probs, self.logits = probs, logits


class MoE(nn.Module):
    """Mixture-of-experts feed-forward: softmax router, top-k experts, optional shared expert.

    Tokens are sorted by expert and each expert runs once on its rows (index_select, then index_add
    of the weighted outputs), so the cost is one matmul per expert, not per token. While training, the
    layer keeps its router statistics in `self.stats` for the auxiliary losses and the logs.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, E = config.d_model, config.n_experts
        self.n_experts, self.top_k, self.renormalize = E, config.moe_top_k, config.moe_renormalize
        self.capacity_factor = config.moe_capacity_factor or None
        self.gate = nn.Linear(C, E, bias=False)  # the router (HF's key: mlp.gate.weight)
        self.experts = Experts(MLP(config, config.moe_d_ff) for _ in range(E))
        if config.shared_expert_d_ff:
            self.shared_expert = MLP(config, config.shared_expert_d_ff)
        if config.shared_expert_gate:
            self.shared_expert_gate = nn.Linear(C, 1, bias=False)
        self.stats: dict[str, Tensor] | None = None
        self.gate_up_stacked = None  # the decode fast path saves/restores this per layer; experts are not stacked

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments an expert may take in this forward; None = dropless (always at inference)."""
        if self.capacity_factor is None or not self.training:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def choose(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [N,C] -> router logits and probabilities [N,E], each token's top-k weights and experts [N,k]."""
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)  # fp32: the top-k order must not flip under bf16
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, weights, chosen

    def route(self, x: Tensor) -> Routing:
        """x [N,C] -> the kept assignments sorted by expert (first choices ahead of second ones)."""
        N, E, k = x.shape[0], self.n_experts, self.top_k
        logits, probs, weights, chosen = self.choose(x)
        # choice-major (a = j*N + n), so under capacity an expert keeps every first choice before any
        # second one, each in token order (GShard's priority); a stable sort keeps that order per expert
        flat_expert = chosen.t().reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        routed = torch.bincount(flat_expert, minlength=E)
        tokens, flat_weights = order % N, weights.t().reshape(-1)[order]
        capacity = self.capacity(N)
        kept = routed
        if capacity is not None:
            rank_in_expert = torch.arange(N * k, device=x.device) - (routed.cumsum(0) - routed)[flat_expert[order]]
            keep = rank_in_expert < capacity
            tokens, flat_weights, kept = tokens[keep], flat_weights[keep], routed.clamp(max=capacity)
        return Routing(tokens, flat_weights, kept, routed, probs, logits)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        if torch.compiler.is_compiling() and not self.training:
            out = self.every_expert(x)
        else:
            r = self.route(x)
            ys = self.experts(x.index_select(0, r.tokens), r.kept.tolist())
            # dropped assignments add nothing: a token dropped by all its experts passes on the residual alone
            out = torch.zeros_like(x).index_add_(0, r.tokens, (ys * r.weights[:, None]).to(x.dtype))
            if self.training:
                self.stats = self.router_stats(r)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.view(B, T, C)

    def every_expert(self, x: Tensor) -> Tensor:
        """Every expert on every token, weighted by its routing weight (0 unless in the token's top-k).

        For torch.compile's static-shape graphs (the compiled decode step), which cannot follow the
        data-dependent row counts of `route`; a decode step has few tokens, so the extra compute is small.
        """
        _, _, weights, chosen = self.choose(x)
        dense = torch.zeros(x.shape[0], self.n_experts, device=x.device, dtype=weights.dtype)
        dense = dense.scatter(1, chosen, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (expert(x) * dense[:, e:e + 1]).to(x.dtype)
        return out

    def router_stats(self, r: Routing) -> dict[str, Tensor]:
        """Switch balance loss E * sum_i f_i * P_i (f_i: share of assignments, P_i: mean router probability;
        1 when uniform), router z-loss, per-expert routed assignments and the number dropped."""
        f = r.routed.float() / r.routed.sum()
        balance = self.n_experts * (f * r.probs.mean(0)).sum()
        z = torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean()
        return {"balance_loss": balance, "z_loss": z, "load": r.routed.detach(),
                "dropped": (r.routed - r.kept).sum().detach()}


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.placement = config.norm_placement
        self.parallel = config.parallel_block
        # DeepNorm up-weights the residual branch so post-LN stays stable at depth
        self.residual_scale = config.deepnorm_alpha if self.placement == "deepnorm" else 1.0
        self.self_attn = Attention(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
        self.input_layernorm = make_norm(config)
        if not (self.parallel and self.placement == "pre"):
            self.post_attention_layernorm = make_norm(config)
        self.dropout = make_dropout(config.dropout)

    def forward(self, x: Tensor, ctx: "ForwardContext") -> Tensor:
        if self.placement == "pre":
            h = self.input_layernorm(x)
            if self.parallel:
                return x + self.dropout(self.self_attn(h, ctx)) + self.dropout(self.mlp(h))
            x = x + self.dropout(self.self_attn(h, ctx))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        a = self.residual_scale
        if self.parallel:
            return self.input_layernorm(a * x + self.dropout(self.self_attn(x, ctx)) + self.dropout(self.mlp(x)))
        x = self.input_layernorm(a * x + self.dropout(self.self_attn(x, ctx)))
        return self.post_attention_layernorm(a * x + self.dropout(self.mlp(x)))


# ----------------------------------------------------------------------------- masks


class ForwardContext:
    """What every layer of one forward pass shares: rotary tables, the mask, cache slots."""

    __slots__ = ("cos", "sin", "mask", "is_causal", "slots", "kv_len", "prefix_kv")

    def __init__(self, cos, sin, mask, is_causal, slots, kv_len, prefix_kv=None):
        self.cos, self.sin, self.mask, self.is_causal, self.slots, self.kv_len = cos, sin, mask, is_causal, slots, kv_len
        self.prefix_kv = prefix_kv


def build_mask(
    config: ModelConfig,
    q_slots: Tensor,
    S: int,
    attention_mask: Tensor | None,
    prefix_len: Tensor | None,
    alibi: Tensor | None,
    dtype: torch.dtype,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Attention mask [B|1, 1|H, T, S]: bool, or float when ALiBi adds a bias.

    Query slot i sees key slot j when j <= i (or j is inside the prefix for prefix-LM), j is
    within the sliding window, j is not padding, and (packed sequences) j is in i's segment.
    Every query also sees itself, so that padding queries get a finite (unused) output instead
    of NaN from an all-masked row.
    """
    k_slots = torch.arange(S, device=q_slots.device)
    i, j = q_slots[:, None], k_slots[None, :]  # [T,1], [1,S]
    allowed = ((j <= i) | (config.mask == "bidirectional"))[None]  # [1,T,S]
    if prefix_len is not None:
        allowed = allowed | (j[None] < prefix_len.view(-1, 1, 1))
    if config.sliding_window is not None:
        allowed = allowed & (i - j < config.sliding_window)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :S].bool()
    if segment_ids is not None:  # block-diagonal: packed examples do not see each other
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :S])
    allowed = (allowed | (i == j)[None]).unsqueeze(1)  # [B,1,T,S]
    if alibi is None:
        return allowed
    bias = -alibi.to(q_slots.device).view(1, -1, 1, 1) * (i - j).abs().to(torch.float32)[None, None]
    return torch.where(allowed, bias, float("-inf")).to(dtype)


# ----------------------------------------------------------------------------- model


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: hidden states, no head (HF's `LlamaModel`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        if config.type_vocab_size:
            self.embed_token_types = nn.Embedding(config.type_vocab_size, config.d_model)
        if config.embed_norm:
            self.embed_norm = make_norm(config)
        self.dropout = make_dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        for i, block in enumerate(self.layers):
            block.self_attn.layer_idx = i
        if config.norm_placement == "pre":  # post-LN blocks already end in a norm
            self.norm = make_norm(config)
        # plain attributes, not buffers: they must stay fp32 when the model is cast to bf16
        self._inv_freq, self._rope_scale = rope_frequencies(config) if config.position == "rope" else (None, 1.0)
        self._alibi = alibi_slopes(config.n_head) if config.position == "alibi" else None
        self.gradient_checkpointing = False

    def _rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids.unsqueeze(-1).float() * self._inv_freq  # [B,T,R/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self._rope_scale != 1.0:  # only YaRN scales; skipping a multiply by 1 saves two ops a step
            cos, sin = cos * self._rope_scale, sin * self._rope_scale
        return cos.to(dtype).unsqueeze(1), signed_sin(sin.to(dtype)).unsqueeze(1)

    def forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        prefix_len: Tensor | int | None = None,
        slots: Tensor | None = None,
        kv_len: int | None = None,
        inputs_embeds: Tensor | None = None,
        prefix_kv: list[tuple[Tensor, Tensor]] | None = None,
        segment_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        B, T = inputs_embeds.shape[:2] if inputs_embeds is not None else input_ids.shape
        device = inputs_embeds.device if inputs_embeds is not None else input_ids.device
        cached = slots is not None
        if not cached:
            slots = torch.arange(T, device=device)
        if position_ids is None:
            if attn_mask is not None:
                raise ValueError("attn_mask needs position_ids: with a mask of its own, the caller knows the positions")
            position_ids = _positions(attention_mask, slots, B)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cfg.position == "learned":
            x = x + self.embed_positions(position_ids)
        if cfg.type_vocab_size:
            x = x + self.embed_token_types(torch.zeros_like(position_ids) if token_type_ids is None else token_type_ids)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = self.dropout(x)

        if isinstance(prefix_len, int):
            prefix_len = torch.full((B,), prefix_len, device=device)
        if attn_mask is not None:
            mask, is_causal = self._given_mask(attn_mask, position_ids, x.dtype), False
        else:
            S = (kv_len if kv_len is not None else self._cache_len()) if cached else T
            mask, is_causal = None, False
            plain = (cfg.mask != "bidirectional" and attention_mask is None and prefix_len is None and self._alibi is None
                     and cfg.sliding_window is None and segment_ids is None and prefix_kv is None)
            if plain and T == S and (not cached or kv_len is not None):
                is_causal = T > 1  # keys are exactly slots 0..T-1: SDPA's own causal kernel
            elif plain and T == 1 and kv_len is not None:
                pass  # one query over the filled slots: it may see them all
            else:
                mask = build_mask(cfg, slots, S, attention_mask, prefix_len, self._alibi, x.dtype, segment_ids)
        if prefix_kv is not None:  # every query sees the P prefix keys: P leading always-on mask columns
            P = prefix_kv[0][0].shape[2]
            visible = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
            mask = torch.cat([visible(mask.shape[:-1] + (P,)), mask], dim=-1)
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = self._rope(position_ids, x.dtype)
        ctx = ForwardContext(cos, sin, mask, is_causal, slots if cached else None, kv_len, prefix_kv)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.norm(x) if cfg.norm_placement == "pre" else x

    def _given_mask(self, attn_mask: Tensor, position_ids: Tensor, dtype: torch.dtype) -> Tensor:
        """A caller's mask as SDPA takes it: bool [B,1,T,S] (True = may attend) or an additive float mask.

        Under ALiBi a bool mask gets the distance bias, taking key slot j to hold position j (true of a
        row's own cache; a caller with another layout, such as a token tree, passes a float mask instead).
        """
        if attn_mask.dim() != 4 or attn_mask.shape[-2] != position_ids.shape[-1]:
            raise ValueError(f"attn_mask must be [batch, 1, {position_ids.shape[-1]}, keys], got {tuple(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool:
            return attn_mask.to(dtype)
        if self._alibi is None:
            return attn_mask
        k_pos = torch.arange(attn_mask.shape[-1], device=attn_mask.device)
        distance = (position_ids[:, None, :, None] - k_pos).abs().to(torch.float32)  # [B,1,T,S]
        bias = -self._alibi.to(attn_mask.device).view(1, -1, 1, 1) * distance
        return torch.where(attn_mask, bias, float("-inf")).to(dtype)

    def _cache_len(self) -> int:
        cache = self.layers[0].self_attn.kv_cache
        if cache is None:
            raise RuntimeError("slots were given but no KV cache is set up: call model.setup_cache(...) first")
        return cache.k.shape[2]


def _positions(attention_mask: Tensor | None, slots: Tensor, B: int) -> Tensor:
    """Position ids [B,T]: slot numbers, shifted per row past left padding when a mask is given."""
    if attention_mask is None:
        return slots.unsqueeze(0).expand(B, -1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, slots]


# A decode step at batch 1 is a few hundred ops, and on small layers their fixed cost (a few us
# each on a CPU) rivals the matmuls. So while a KV cache is set up, q/k/v and gate/up each run as
# one matmul on stacked copies of their weights; the modules and the state dict are untouched.
# Every output element is the same dot product as before (bit for bit with MKL on CPU; other BLAS
# libraries may pick other kernels for the wider shape). The copies cost memory and a copy per
# `setup_cache`, which pays only while the fixed cost shows, so projections whose stacked weight
# has more elements than this keep their separate matmuls.
STACK_MAX_NUMEL = 2**20


@torch.no_grad()
def _stack_linears(*linears: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of plain nn.Linear layers stacked along the output dim; None where that does not apply."""
    # swapped-in layers (LoRA, quantised) and hooks must keep running as themselves
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in linears):
        return None
    if sum(m.weight.numel() for m in linears) > STACK_MAX_NUMEL:
        return None
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return weight, bias


class Transformer(nn.Module):
    """Decoder-only language model: `model(input_ids, attention_mask)` -> logits [B,T,vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output head (again after a load that assigned tensors)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        prefix_len: Tensor | int | None = None,
        slots: Tensor | None = None,
        kv_len: int | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        prefix_kv: list[tuple[Tensor, Tensor]] | None = None,
        segment_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits [B,T,V].

        attention_mask: [B,S] with 1 for real tokens, 0 for (left) padding; S = T without a cache,
            else the number of cache slots in use. position_ids default to counting real tokens only.
        prefix_len: for prefix-LM masks, the length [B] (or int) of the bidirectional prefix.
        slots: cache slots [T] the new tokens are written to (needs `setup_cache`).
        kv_len: read only the first kv_len cache slots (eager decoding); None reads the whole cache.
        inputs_embeds: [B,T,C] used instead of embedding input_ids (soft prompts); input_ids is then None.
        prefix_kv: per layer (keys, values) [B,K,P,D] every query also attends to, ahead of the sequence
            (prefix tuning); they are used as given (no rotary), as a cache of P entries is.
        segment_ids: [B,T] example number of each token of a packed row (0 = padding): attention stays
            inside a segment; pass position_ids restarting at 0 per segment with it.
        attn_mask: a ready mask [B,1,T,S] over the keys the cache returns (bool, True = may attend, or
            additive float), replacing the one built from the arguments above; needs position_ids.
            For callers with their own layout: token trees (Medusa), paged caches (the engine).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        shape = tuple((input_ids if inputs_embeds is None else inputs_embeds).shape)
        if len(shape) != (2 if inputs_embeds is None else 3):
            raise ValueError(f"input_ids must be [batch, seq] (inputs_embeds [batch, seq, d_model]), got {shape}")
        if slots is None and self.config.position == "learned" and shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {shape[1]} exceeds max_seq_len {self.config.max_seq_len}")
        if slots is not None and (prefix_kv is not None or segment_ids is not None):
            raise ValueError("prefix_kv and segment_ids are for training passes; they do not combine with a KV cache")
        hidden = self.model(input_ids, attention_mask, position_ids, prefix_len, slots, kv_len,
                            inputs_embeds=inputs_embeds, prefix_kv=prefix_kv, segment_ids=segment_ids,
                            attn_mask=attn_mask)
        return self.lm_head(hidden)

    # -- caches

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        """Allocate a static KV cache in every layer; max_len is rounded up to a multiple of 8.

        Small projections also get stacked weights (see STACK_MAX_NUMEL), copies taken now: the
        weights must not change until `clear_cache`, which drops both.
        """
        max_len = 8 * math.ceil(max_len / 8)
        p = self.model.embed_tokens.weight  # not lm_head: a quantised head has no .weight
        cfg = self.config
        self.attach_caches([
            KVCache(batch_size, max_len, cfg.n_kv_head, cfg.head_dim, dtype or p.dtype, device or p.device)
            for _ in self.model.layers
        ])

    def attach_caches(self, caches: list[nn.Module]) -> None:
        """Install one KV cache per layer, any module with `update(slots, k, v) -> (keys, values)`
        (the static `KVCache`, the engine's paged cache); stacks small projections as `setup_cache` says."""
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_stacked = _stack_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            if isinstance(mlp, MLP) and mlp.gated:
                mlp.gate_up_stacked = _stack_linears(mlp.gate_proj, mlp.up_proj)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
            layer.self_attn.qkv_stacked = None
            layer.mlp.gate_up_stacked = None

    # -- training helpers

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (memory for compute)."""
        self.model.gradient_checkpointing = enabled

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.config
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.scaled_residual_init else cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if cfg.norm_placement == "deepnorm":
            self._deepnorm_init()

    def _deepnorm_init(self) -> None:
        # DeepNet (Wang et al. 2022): Xavier init, value/output/FFN projections scaled down by beta
        beta = self.config.deepnorm_beta
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in f".{name}":
                gain = 1.0 if name.endswith(("q_proj", "k_proj")) else beta
                nn.init.xavier_normal_(module.weight, gain=gain)


def build_model(config: ModelConfig) -> nn.Module:
    """The model class `config.architecture` names: Transformer, Encoder (BERT) or EncoderDecoder (T5)."""
    return {"decoder": Transformer, "encoder": Encoder, "encoder-decoder": EncoderDecoder}[config.architecture](config)


# ----------------------------------------------------------------------------- encoder-only (BERT family)


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense, activation, norm, then the (tied) vocabulary projection with a bias."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.act = MLP(config).act
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class Encoder(nn.Module):
    """Bidirectional encoder (BERT): `model(input_ids, attention_mask, token_type_ids)` -> MLM logits [B,T,V].

    The Backbone's blocks with mask='bidirectional'; `embed` gives pooled sentence vectors. With
    config.n_labels > 0 the MLM head gives way to BERT's pooler (tanh over the first token) and a
    classifier, as in HF's BertForSequenceClassification: `classify` returns [B,n_labels].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if config.n_labels:
            self.pooler = nn.Linear(config.d_model, config.d_model)
            self.classifier = nn.Linear(config.d_model, config.n_labels)
        else:
            self.mlm_head = MaskedLMHead(config)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and not self.config.n_labels:
            self.mlm_head.decoder.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """Last hidden states [B,T,C]; positions count from 0 in every row (BERT pads on the right)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        positions = torch.arange(T, device=input_ids.device).expand(B, -1)
        return self.model(input_ids, attention_mask, positions, token_type_ids=token_type_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if self.config.n_labels:
            raise ValueError("a classification encoder has no MLM head: call classify(...)")
        return self.mlm_head(self.hidden_states(input_ids, attention_mask, token_type_ids))

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Sentence embeddings [B,C]: the mean of the real tokens' last hidden states (as sentence-transformers)."""
        h = self.hidden_states(input_ids, attention_mask)
        weight = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        return (h * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None) -> Tensor:
        """Class logits [B,n_labels] (HF's BertForSequenceClassification)."""
        if not self.config.n_labels:
            raise ValueError("this encoder has no classification head: set config.n_labels > 0")
        first = self.hidden_states(input_ids, attention_mask, token_type_ids)[:, 0]
        return self.classifier(torch.tanh(self.pooler(first)))

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    num_params = Transformer.num_params
    init_weights = Transformer.init_weights  # the same normal init over Linear, Embedding and norm modules
    _deepnorm_init = Transformer._deepnorm_init


# ----------------------------------------------------------------------------- encoder-decoder (T5 family)


def relative_position_bucket(relative: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each (key - query) distance: exact for small ones, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:  # half the buckets for keys after the query
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets
        relative = relative.abs()
    else:
        relative = -relative.clamp(max=0)
    exact = n_buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact)
                     * (n_buckets - exact)).long()
    large = large.clamp(max=n_buckets - 1)
    return buckets + torch.where(relative < exact, relative, large)


class CrossAttention(Attention):
    """Decoder queries over encoder keys/values; `memory` projects those once per input (cached in generation)."""

    def memory(self, encoded: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = encoded.shape
        k = self.k_proj(encoded).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(encoded).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class CrossBlock(Block):
    """A pre-LN decoder block: self-attention, cross-attention over the encoder output, MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.cross_attn = CrossAttention(config)
        self.cross_attn_layernorm = make_norm(config)

    def forward(self, x: Tensor, ctx: ForwardContext, kv: tuple[Tensor, Tensor], memory_mask: Tensor | None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), ctx))
        x = x + self.dropout(self.cross_attn(self.cross_attn_layernorm(x), kv, memory_mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Stack(nn.Module):
    """One T5 stack: blocks sharing one relative-position-bias table, then a final norm."""

    def __init__(self, config: ModelConfig, n_layer: int, causal: bool):
        super().__init__()
        self.config, self.causal = config, causal
        block = CrossBlock if causal else Block
        self.layers = nn.ModuleList(block(config) for _ in range(n_layer))
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i
        self.relative_attention_bias = nn.Embedding(config.relative_buckets, config.n_head)
        self.norm = make_norm(config)
        self.dropout = make_dropout(config.dropout)
        self.gradient_checkpointing = False

    def bias(self, q_pos: Tensor, S: int, key_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Additive mask [B|1,H,T,S]: the position bias, a large negative where a key is padding or in the future."""
        cfg = self.config
        k_pos = torch.arange(S, device=q_pos.device)
        relative = k_pos[None, :] - q_pos[:, None]  # [T,S]
        buckets = relative_position_bucket(relative, not self.causal, cfg.relative_buckets, cfg.relative_max_distance)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None].to(dtype)  # [1,H,T,S]
        allowed = (relative <= 0) if self.causal else torch.ones_like(relative, dtype=torch.bool)
        allowed = allowed[None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :S].bool()
        # finfo.min rather than -inf: a fully padded row stays finite, as in transformers
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, slots: Tensor | None = None,
                kv_len: int | None = None, memory: list[tuple[Tensor, Tensor]] | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        T = x.shape[1]
        cached = slots is not None
        q_pos = slots if cached else torch.arange(T, device=x.device)
        S = kv_len if cached else T
        ctx = ForwardContext(None, None, self.bias(q_pos, S, key_mask, x.dtype), False, slots, kv_len)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            args = (x, ctx, memory[i], memory_mask) if self.causal else (x, ctx)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.dropout(self.norm(x))


class EncoderDecoder(nn.Module):
    """Encoder-decoder LM (T5): `model(input_ids, attention_mask, decoder_input_ids=...)` -> logits [B,T_dec,V].

    For generation: `encode` once, `memory` projects each decoder layer's cross-attention keys/values once,
    then `decode` steps over the decoder's own KV cache (`setup_cache`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, config.n_layer, causal=False)
        self.decoder = Stack(config, config.n_decoder_layer, causal=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.encoder(self.shared(input_ids), key_mask=attention_mask)

    def memory(self, encoded: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [layer.cross_attn.memory(encoded) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids: Tensor, memory: list[tuple[Tensor, Tensor]],
               attention_mask: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
               slots: Tensor | None = None, kv_len: int | None = None) -> Tensor:
        """Logits [B,T,V] for decoder tokens given the encoder memory; attention_mask masks encoder padding."""
        x = self.shared(decoder_input_ids)
        memory_mask = None
        if attention_mask is not None:
            memory_mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            memory_mask = memory_mask.masked_fill(~attention_mask.bool(), torch.finfo(x.dtype).min)[:, None, None]
        h = self.decoder(x, decoder_attention_mask, slots, kv_len, memory, memory_mask)
        if self.config.scale_decoder_output:
            h = h * self.config.d_model**-0.5
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                decoder_input_ids: Tensor, decoder_attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.dim() != 2 or decoder_input_ids.dim() != 2:
            raise ValueError("input_ids and decoder_input_ids must be [batch, seq]")
        memory = self.memory(self.encode(input_ids, attention_mask))
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> None:
        """A static KV cache for each decoder self-attention (cross-attention keys come from `memory`)."""
        max_len = 8 * math.ceil(max_len / 8)
        p, cfg = self.shared.weight, self.config
        for layer in self.decoder.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_len, cfg.n_kv_head, cfg.head_dim,
                                               dtype or p.dtype, device or p.device)

    def clear_cache(self) -> None:
        for layer in self.decoder.layers:
            layer.self_attn.kv_cache = None

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    num_params = Transformer.num_params

    @torch.no_grad()
    def init_weights(self) -> None:
        # T5's init (Mesh TF): no score scaling, so queries start 1/sqrt(D) smaller instead
        Transformer.init_weights(self)
        for stack in (self.encoder, self.decoder):
            for layer in stack.layers:
                for attn in (layer.self_attn, getattr(layer, "cross_attn", None)):
                    if attn is not None and attn.scale == 1.0:
                        attn.q_proj.weight.mul_(attn.head_dim**-0.5)
