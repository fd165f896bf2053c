"""LLaMA-3 by hand, in plain torch.

One module serves both of Mutual-Taught's models:
- the policy (`kind="policy"`): Transformer + `lm_head` [V, dim] (or tied to the embedding);
- the reward model (`kind="reward"`): Transformer + `score` [1, dim], read at the last token
  of each sequence, as transformers' LlamaForSequenceClassification with num_labels=1.

Parameter names equal Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`,
`score.weight`), so checkpoints map one to one.

`Llama.forward` returns hidden states; the loss kernels own the vocabulary projection, so the full
[tokens, V] logits are never built in training. Two input layouts:
- packed: tokens [N] of several sequences back to back, cu_seqlens [B+1] (int32, starts at 0),
  positions [N] (restarting at 0 in each sequence), max_seqlen. Attention is causal within each
  sequence and never crosses one.
- batch: tokens [B, T], optional attention_mask [B, T] (1 = real token) and positions [B, T].

Attention on CUDA in fp16/bf16 (the tensors' dtype, or autocast's; q, k and v are cast to it):
flash_attn_varlen_func / flash_attn_func where flash-attn imports; else, for packed sequences, torch's
own varlen_attn (torch >= 2.10, signature detected). Otherwise, and on the CPU, torch's
scaled_dot_product_attention (packed sequences padded into length buckets).

Nothing here knows of distribution, training or generation: FSDP, activation checkpointing, compile
and the KV cache are applied from outside. A Block's caller may swap its element-wise operations and
its attention (LayerOps) for others of the same result: the sampler passes an attention that reads and
writes its cache, and on CUDA fused Triton kernels. For inference, merge_projections makes q/k/v and
gate/up one GEMM each without changing a parameter's name or bytes.
"""

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 0  # 0: dim // n_heads
    intermediate_size: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128009
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # config.json keys we carry but do not use

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


# Named flavours: the real models' shapes, used by benchmarks and memory plans.
FLAVOURS = {
    "llama3-8b": ModelArgs(
        rope_scaling=None,
    ),
    "llama3.1-8b": ModelArgs(
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, scale in the input dtype (as Llama's reference does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with Llama-3 frequency scaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = args.rope_scaling
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    # rope_type == "llama3" (checkpoint.py refuses the others): long wavelengths are slowed by
    # `factor`, short ones kept, and the band between them interpolated smoothly.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [...] -> cos, sin [..., head_dim], computed in fp32 then cast to `dtype`."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [..., head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., heads, head_dim]; cos, sin [..., head_dim] (broadcast over heads). Half-split rotation."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@functools.cache
def _flash_attn():
    """flash-attn's module, or None where it is not installed (it needs CUDA to build)."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


@functools.cache
def _varlen_attn():
    """torch's varlen attention as a causal f(q, k, v, cu_seqlens, max_seqlen) on packed [N, H, D], or
    None where torch has none (before 2.10). Its signature differs between versions: 2.10 takes
    is_causal=True, later ones window_size=(-1, 0); enable_gqa where it exists, else K/V are repeated
    to the query heads. It has no CPU kernel, and autocast does not cast its inputs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    gqa = {"enable_gqa": True} if "enable_gqa" in params else None

    def attend_varlen(q, k, v, cu_seqlens, max_seqlen):
        if gqa is None and k.shape[1] != q.shape[1]:
            # [N, Hkv, D] -> [N, Hq, D]: query head h reads KV head h // (Hq / Hkv), as SDPA's enable_gqa
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **causal, **(gqa or {}))
    return attend_varlen


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


@dataclass
class AttnLayout:
    """How the tokens of one forward are laid out; built once per forward, shared by every layer.

    packed: cu_seqlens [B+1], max_seqlen, and for the SDPA fallback `buckets`: sequences of similar
    length, each (pad_index [b, L], pad_valid [b, L]) indexing the N packed tokens right-padded to
    the bucket's longest L, and `restore` [N], which puts the buckets' real tokens back in packed order.
    batch: mask [B, 1, T, T] boolean (True = may attend) or None for plain causal.
    use_flash: flash-attn; use_varlen: torch's varlen attention (packed only, no buckets needed).
    """
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    buckets: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    restore: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    use_flash: bool = False
    use_varlen: bool = False


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and compute_dtype(x) in (torch.float16, torch.bfloat16)


def flash_attn_usable(x: torch.Tensor) -> bool:
    return _half_on_cuda(x) and _flash_attn() is not None


def varlen_usable(x: torch.Tensor) -> bool:
    return _half_on_cuda(x) and _varlen_attn() is not None


def make_layout(x: torch.Tensor, cu_seqlens=None, max_seqlen=None, attention_mask=None) -> AttnLayout:
    use_flash = flash_attn_usable(x)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()  # one device sync per forward, shared with the buckets
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if max_seqlen is None:
            max_seqlen = longest
        elif max_seqlen < longest:  # flash-attn would silently attend to a truncated window
            raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest packed sequence ({longest})")
        layout = AttnLayout(cu_seqlens=cu_seqlens, max_seqlen=int(max_seqlen), use_flash=use_flash,
                            use_varlen=not use_flash and varlen_usable(x))
        if not (layout.use_flash or layout.use_varlen):
            layout.buckets, layout.restore = _length_buckets(bounds, x.device)
        return layout
    if attention_mask is None:
        return AttnLayout(use_flash=use_flash)
    # A padding mask takes SDPA with an explicit mask (flash-attn's padded path would need unpadding).
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # [T, T]
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
    # Each query also sees itself, so a padding row never softmaxes over nothing (NaN that would
    # then leak through 0 * NaN into the real rows of the next layer).
    eye = torch.eye(T, dtype=torch.bool, device=x.device)
    return AttnLayout(mask=(causal & keys) | eye)


def row_length(n: int) -> int:
    """The padded length of an n-token sequence: n rounded up to 16 tokens up to 64, then to an eighth of
    the next power of two (80, 96, 112, 128, 160, 192, ...): past 64 tokens under 1/4 padding, 4 lengths a
    power of two. A sequence padded to its own row_length computes the same bits beside any others: a
    kernel's blocking follows the padded length, which then depends on the sequence alone."""
    step = 16 if n <= 64 else (1 << (n - 1).bit_length()) // 8
    return max(step, -(-n // step) * step)


def _length_buckets(bounds: list[int], device) -> tuple[list, torch.Tensor]:
    """The SDPA fallback's layout of packed sequences: by row_length, longest first, each bucket's
    sequences right-padded to that length (at most 1 / 0.8^2 = 1.56x the real attention work past 64
    tokens). One [B, max_seqlen] padding would make every sequence pay the longest one's attention (and
    memory) cost, and a bucket padded to its longest member would make a sequence's numbers depend on
    the others packed with it. With right padding, a causal mask alone keeps every real query off the
    padding, so SDPA runs with is_causal=True. bounds: cu_seqlens as a list."""
    starts = bounds[:-1]
    lens = [b - a for a, b in zip(bounds, bounds[1:])]
    classes: dict[int, list[int]] = {}
    for i in range(len(lens)):
        classes.setdefault(row_length(lens[i]), []).append(i)
    buckets, real = [], []  # real: the packed index of every real token, in the buckets' order
    for width in sorted(classes, reverse=True):
        members = classes[width]
        offsets = torch.arange(width)  # [L]
        member_lens = torch.tensor([lens[m] for m in members])  # [b]
        valid = offsets[None, :] < member_lens[:, None]  # [b, L]
        index = torch.where(valid, torch.tensor([starts[m] for m in members])[:, None] + offsets, 0)
        buckets.append((index.to(device), valid.to(device)))
        real.append(index[valid])
    restore = torch.empty(sum(lens), dtype=torch.long)
    restore[torch.cat(real) - starts[0]] = torch.arange(sum(lens))
    return buckets, restore.to(device)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
        self.qkv_proj: Merged | None = None  # set by merge_projections

    def project(self, x):
        """x [..., dim] -> q [..., Hq, D], k and v [..., Hkv, D], before rotary: views of one GEMM's
        output where merge_projections merged the three weights (and no gradient is needed)."""
        lead = x.shape[:-1]
        merged = usable_merge(self, "qkv_proj")
        if merged is not None:
            q, k, v = merged(x).split(merged.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(*lead, self.n_heads, self.head_dim), k.view(*lead, self.n_kv_heads, self.head_dim),
                v.view(*lead, self.n_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, layout, ops: "LayerOps"):
        """ops.attend(q, k, v, cos, sin, layout) -> [..., Hq, D] applies rotary and attends: rope_attend by
        default; the sampler's also reads and writes its K/V cache (with a layout of its own)."""
        q, k, v = self.project(x)
        out = ops.attend(q, k, v, cos, sin, layout)  # same leading shape as x, [..., Hq, D]
        return self.o_proj(out.flatten(-2))


def rope_attend(q, k, v, cos, sin, layout: AttnLayout):
    """Rotary on q and k, then `attend`: a Block's attention unless its caller passes its own."""
    return attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, layout)


def attend(q, k, v, layout: AttnLayout):
    """Causal grouped-query attention. Packed: q [N, Hq, D]; batch: q [B, T, Hq, D]. Returns q's shape."""
    if layout.use_flash or layout.use_varlen:
        # Neither is cast by autocast: under it q and k leave RoPE in fp32 beside a bf16 v.
        dtype = compute_dtype(q)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    if layout.use_varlen:
        return _varlen_attn()(q, k, v, layout.cu_seqlens.to(torch.int32), layout.max_seqlen)  # [N, Hq, D]
    if layout.use_flash:
        fa = _flash_attn()
        if layout.cu_seqlens is not None:
            cu = layout.cu_seqlens.to(torch.int32)
            return fa.flash_attn_varlen_func(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, causal=True)
        return fa.flash_attn_func(q, k, v, causal=True)
    if layout.cu_seqlens is not None:
        # Per bucket: [N, H, D] -> [b, H, L, D] right-padded, attend, keep the real rows; then the
        # buckets' rows back in packed order.
        outs = []
        for index, valid in layout.buckets:
            q_pad, k_pad, v_pad = (t[index].transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, is_causal=True, enable_gqa=True)
            outs.append(out.transpose(1, 2)[valid])  # [n_b, Hq, D]
        return torch.cat(outs)[layout.restore]  # [N, Hq, D]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if layout.mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, enable_gqa=True)
    return out.transpose(1, 2)  # [B, T, Hq, D]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        bias = args.mlp_bias
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=bias)
        self.gate_up_proj: Merged | None = None  # set by merge_projections

    def forward(self, x, ops: "LayerOps"):
        merged = usable_merge(self, "gate_up_proj")
        if merged is not None:
            gate, up = merged(x).split(merged.sizes, dim=-1)  # views of one GEMM's output
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.silu_mul(gate, up))


def silu_mul(gate, up):
    return F.silu(gate) * up


def add_norm(x, residual, norm: RMSNorm):
    """(x + residual, norm(x + residual)); x itself and norm(x) where residual is None (the first block)."""
    hidden = x if residual is None else x + residual
    return hidden, norm(hidden)


@dataclass(frozen=True)
class LayerOps:
    """The operations inside a Block that a caller may swap for fused ones of the same result: the
    sampler's decode step on CUDA takes the Triton kernels of mtcore/kernels/ (add_rms_norm, silu_mul,
    and rope_cache inside an attention that writes its cache). The defaults are plain torch and
    differentiable: training always runs them."""
    attend: Callable = rope_attend  # (q, k, v, cos, sin, layout) -> [..., Hq, D]; q and k not yet rotated
    add_norm: Callable = add_norm  # (x, residual or None, norm) -> (x + residual, norm(x + residual))
    silu_mul: Callable = silu_mul  # (gate, up) -> silu(gate) * up


TORCH_OPS = LayerOps()


class Block(nn.Module):
    """One transformer block, as Llama's: h = x + attn(norm1(x)); out = h + mlp(norm2(h)).
    forward(x, residual) -> (mlp output, h): the stream after the block is their sum, left to the caller,
    and the stream before it is x + residual (x alone where residual is None). So a caller can carry
    the residual into the next norm, and every residual add meets a norm (the sampler's decode step,
    whose fused kernel does both); Transformer.forward sums between blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, residual, cos, sin, layout, ops: LayerOps = TORCH_OPS):
        residual, h = ops.add_norm(x, residual, self.input_layernorm)
        x = self.self_attn(h, cos, sin, layout, ops)
        residual, h = ops.add_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(h, ops), residual


class Merged:
    """Several Linear layers' weights (and biases) concatenated on the output dim, as one GEMM, for
    inference. The layers' parameters are left as views of the merged tensors: no memory is added,
    state_dict keeps Hugging Face's names and bytes, and an in-place update of a parameter is seen here."""

    def __init__(self, parts: list[nn.Linear]):
        self.parts, self.sizes = parts, [p.out_features for p in parts]
        # Built outside inference mode: parameters viewing an inference tensor could not train afterwards.
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([p.weight for p in parts])  # [sum(out), in]
            self.bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        for p, (a, b) in zip(parts, self._rows()):
            p.weight.data = self.weight[a:b]
            if self.bias is not None:
                p.bias.data = self.bias[a:b]

    def _rows(self):
        start = 0
        for n in self.sizes:
            yield start, start + n
            start += n

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)

    def intact(self) -> bool:
        """Whether every part's weight and bias still view the merged tensors (a .to(), a parameter
        replaced or loaded with assign=True, FSDP's sharding, a deepcopy: each breaks it)."""
        for p, (a, _) in zip(self.parts, self._rows()):
            if p.weight.data_ptr() != self.weight[a].data_ptr():
                return False
            if self.bias is not None and (p.bias is None or p.bias.data_ptr() != self.bias[a].data_ptr()):
                return False
        return True


def usable_merge(owner: nn.Module, name: str) -> Merged | None:
    """owner's merged GEMM (attribute `name`) where a forward may take it: without gradients (the
    merged tensors' gradient would not reach the parameters) and while it is intact. One no longer
    intact is dropped, with the copy of the old weights it held. Checked eagerly; a compiled graph keeps
    what held when it was traced (the sampler merges just before it compiles)."""
    merged = getattr(owner, name)
    if merged is None or torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling() or merged.intact():
        return merged
    setattr(owner, name, None)
    return None


class Transformer(nn.Module):
    """Embedding, blocks, final norm. Returns hidden states of the input's leading shape."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # As transformers' LlamaModel: the pad id's row gets no gradient (padding_idx), so training
        # matches a transformers-based trainer even where the pad token occurs in the text.
        pad = args.pad_token_id if isinstance(args.pad_token_id, int) and 0 <= args.pad_token_id < args.vocab_size \
            else None
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, padding_idx=pad)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self._inv_freq = {}  # device -> [head_dim // 2] fp32; kept out of state_dict and .to(dtype)

    def inv_freq(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.args, device)
        return self._inv_freq[key]

    def forward(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None, attention_mask=None):
        """tokens [N] packed (with cu_seqlens) or [B, T]. Returns hidden [N, dim] or [B, T, dim]."""
        if cu_seqlens is not None:
            if tokens.dim() != 1:
                raise ValueError(f"packed tokens must be flat [N], got shape {tuple(tokens.shape)}")
            if positions is None:
                positions = packed_positions(cu_seqlens)
        elif tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T] (or flat [N] with cu_seqlens), got {tuple(tokens.shape)}")
        elif positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq(x.device), positions, x.dtype)
        layout = make_layout(x, cu_seqlens, max_seqlen, attention_mask)
        for layer in self.layers:
            # The stream summed between blocks: a checkpointed block (parallel.checkpoint_blocks) saves
            # one input, not two. (The sampler carries the residual instead, into the fused norms.)
            out, residual = layer(x, None, cos, sin, layout)
            x = out + residual
        return self.norm(x)


def merge_projections(model: "Llama") -> "Llama":
    """q/k/v and gate/up as one GEMM each in every block, for inference (the sampler merges the models
    it generates with): one read of x and one kernel instead of three and two. Idempotent; checkpoints
    are still read and written in Hugging Face's layout, byte for byte (checkpoint.save_model copies
    the views out)."""
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if attn.qkv_proj is None or not attn.qkv_proj.intact():
            attn.qkv_proj = Merged([attn.q_proj, attn.k_proj, attn.v_proj])
        if mlp.gate_up_proj is None or not mlp.gate_up_proj.intact():
            mlp.gate_up_proj = Merged([mlp.gate_proj, mlp.up_proj])
    return model


def packed_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [B+1] -> positions [N], restarting at 0 at each sequence start."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)  # [N]
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B] index of the last real token of each row (right or left padding)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)
    return (idx * attention_mask.to(idx.dtype)).argmax(-1)


class Llama(nn.Module):
    """A policy (language-model head) or a reward model (scalar `score` head) over one Transformer."""

    def __init__(self, args: ModelArgs, kind: str = "policy"):
        super().__init__()
        if kind not in ("policy", "reward"):
            raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
        self.args, self.kind = args, kind
        self.model = Transformer(args)
        if kind == "policy":
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
            self.tie_weights()
        else:
            self.score = nn.Linear(args.dim, 1, bias=False)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() copy the parameters out of the merged tensors: drop the merges first,
        # so the old copies they hold are freed (generate merges again).
        for block in self.model.layers:
            block.self_attn.qkv_proj = block.mlp.gate_up_proj = None
        return super()._apply(fn, *args, **kwargs)

    def tie_weights(self):
        """Point lm_head at the embedding when the config ties them (again after loading)."""
        if self.kind == "policy" and self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection: [V, dim] for a policy, [1, dim] for a reward model."""
        return self.lm_head.weight if self.kind == "policy" else self.score.weight

    def forward(self, tokens, positions=None, cu_seqlens=None, max_seqlen=None, attention_mask=None):
        return self.model(tokens, positions, cu_seqlens, max_seqlen, attention_mask)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Random init for models built from scratch (checkpoints overwrite everything)."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.randn(module.weight.shape, generator=gen) * self.args.initializer_range
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        return self

    def logits(self, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """tokens [B, T] -> [B, T, V]. For evaluation only: training never builds full logits."""
        if self.kind != "policy":
            raise TypeError("logits() needs a policy model; this is a reward model")
        return self.lm_head(self(tokens, attention_mask=attention_mask))

    def rewards(self, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """tokens [B, T] -> [B] fp32 rewards, read at the last real token of each row.

        The real tokens are those of attention_mask; without one, those that are not the config's
        pad_token_id (as transformers does), or all. With a mask, a real token equal to the pad id
        (Llama-3 fine-tunes often pad with <|eot_id|>, the token the reward is read at) still counts.
        """
        if self.kind != "reward":
            raise TypeError("rewards() needs a reward model; this is a policy")
        if attention_mask is None:
            pad = self.args.pad_token_id
            attention_mask = torch.ones_like(tokens) if pad is None else (tokens != pad).long()
        hidden = self(tokens, attention_mask=attention_mask)  # [B, T, dim]
        last = hidden[torch.arange(tokens.shape[0], device=tokens.device), last_token_index(attention_mask)]
        return self.score_rewards(last)

    def packed_rewards(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed hidden [N, dim] -> [B] fp32 rewards at each sequence's last token."""
        return self.score_rewards(hidden[cu_seqlens[1:].long() - 1])

    def score_rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., dim] -> rewards [...] from the score head, computed in fp32 even under
        autocast (a bf16 GEMM would round every reward to bf16 before pairing, win rates and the
        epsilon filter). Differentiable in hidden and the head. A row-wise product and sum, not a GEMV:
        the GEMV's result for a row follows its position among the rows (the kernels' tail rows reduce in
        another order), and a reward must not depend on its micro-batch (train.hidden_states)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return (hidden.float() * self.score.weight.float()[0]).sum(-1)  # [..., dim] -> [...]
