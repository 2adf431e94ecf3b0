"""Encoder-decoder Transformer (pre-norm) for seq2seq, written out by hand so it traces and exports cleanly.

Shapes: B batch, S source length, T target length, D d_model, H heads, Dh = D // H, V vocab,
L decoder layers, P cached decoder positions.

Design choices:
- pre-norm residual blocks (``x + f(ln(x))``) with a final LayerNorm on each side;
- sinusoidal positional encoding computed from explicit positions (no table), so each row of a
  continuous batch can sit at its own position;
- one shared embedding for source and target tokens, **tied** to the output projection (the tokenizer is
  shared, and tying saves ``V * D`` parameters);
- attention is plain matmul + masked softmax; masked scores are filled with the dtype's most negative finite
  value (not ``-inf``), so a fully masked row gives a uniform distribution instead of NaN.

Step API (used by export and serve, see docs/ARCHITECTURE.md): ``encode`` runs the encoder once and
precomputes the cross-attention keys/values of every decoder layer; ``decode_step`` feeds one token per row
with a key/value cache whose empty (left-padding) slots are masked by ``past_pad_mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepserve.train.config import check


@dataclass
class Seq2SeqArgs:
    """Architecture of ``Seq2SeqTransformer`` (stored in checkpoints as ``model.args``)."""

    vocab_size: int = 256
    """Number of token ids (shared by source and target)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads; must divide ``d_model``."""
    n_encoder_layers: int = 2
    """Encoder blocks."""
    n_decoder_layers: int = 2
    """Decoder blocks."""
    d_ff: int = 512
    """Hidden width of the feed-forward blocks."""
    dropout: float = 0.1
    """Dropout on attention weights and residual branches (training only)."""
    max_len: int = 256
    """Longest sequence (source, or decoder input) the model was trained for; positions beyond it still work
    (the encoding is computed, not looked up) but were never seen in training."""
    pad_id: int = 0
    """Padding token id; ``forward`` derives its masks from it."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 4, "vocab_size", "must be >= 4", self.vocab_size)
        check(self.d_model >= 2 and self.d_model % 2 == 0, "d_model", "must be an even number >= 2", self.d_model)
        check(self.n_heads >= 1, "n_heads", "must be >= 1", self.n_heads)
        check(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}", self.n_heads)
        check(self.n_encoder_layers >= 1, "n_encoder_layers", "must be >= 1", self.n_encoder_layers)
        check(self.n_decoder_layers >= 1, "n_decoder_layers", "must be >= 1", self.n_decoder_layers)
        check(self.d_ff >= 1, "d_ff", "must be >= 1", self.d_ff)
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
        check(self.max_len >= 1, "max_len", "must be >= 1", self.max_len)
        check(0 <= self.pad_id < self.vocab_size, "pad_id", f"must be in [0, {self.vocab_size})", self.pad_id)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor, scale: float, dropout: nn.Dropout
) -> torch.Tensor:
    """Scaled dot-product attention. q (B,H,Tq,Dh), k/v (B,H,Tk,Dh), blocked broadcastable to (B,H,Tq,Tk),
    True where a query must not look; ``scale`` is 1/sqrt(Dh), a Python constant so tracing does not read a
    shape. Returns (B,H,Tq,Dh)."""
    att = (q @ k.transpose(-2, -1)) * scale  # (B,H,Tq,Tk)
    att = att.masked_fill(blocked, torch.finfo(att.dtype).min)
    att = dropout(F.softmax(att, dim=-1))
    return att @ v  # (B,H,Tq,Dh)


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                  past_bias: torch.Tensor) -> torch.Tensor:
    """``attend`` of one new query over its cached keys and its own new key, without concatenating them: a
    cache copy per step would cost O(P) in a decode step that otherwise reads it once. q (B,H,1,Dh) already
    scaled by 1/sqrt(Dh), k, v (B,H,1,Dh), past_k/v (B,H,P,Dh), past_bias (B,1,1,P) ``blocked_bias`` of the
    empty cache slots (the own slot never is). Returns (B,H,1,Dh)."""
    past = q @ past_k.transpose(-2, -1) + past_bias  # (B,H,1,P)
    att = F.softmax(torch.cat([past, (q * k).sum(-1, keepdim=True)], dim=-1), dim=-1)  # (B,H,1,P+1)
    return att[..., :-1] @ past_v + att[..., -1:] * v  # (B,H,1,Dh)


def blocked_bias(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocked (B,K) bool True = masked -> an additive mask (B,1,1,K): the dtype's most negative finite value
    where blocked, else 0. A finite score vanishes against it in float rounding, so adding it masks as
    ``masked_fill`` does, in one add per layer from a mask built once per decode step."""
    # bool * 0-dim float: one op (ONNX: Cast, Mul); an unsqueeze is one op, a [:, None] a slice and an unsqueeze
    return (blocked * torch.tensor(torch.finfo(dtype).min, dtype=dtype)).unsqueeze(1).unsqueeze(1)


def affine(x: torch.Tensor, linear: nn.Linear, scale: float = 1.0, rows: int | None = None) -> torch.Tensor:
    """``linear(x)`` for rows x (B,in) as one ``addmm`` (the bias rides in the product; it exports as the same Gemm as
    ``nn.Linear``), its first ``rows`` outputs (all when None) times ``scale``. Traced, the scale goes into the
    weights: freezing and ONNX constant folding turn that into scaled weights, so the graph spends no op on it.
    Eager (training's greedy validation, export's parity runs), scaled weights would be rebuilt in every layer on
    every step, so the scale multiplies the output instead (the same values up to float rounding)."""
    weight, bias = linear.weight, linear.bias
    if scale == 1.0:
        return torch.addmm(bias, x, weight.t())
    n = linear.out_features if rows is None else rows
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        weight, bias = torch.cat([weight[:n] * scale, weight[n:]]), torch.cat([bias[:n] * scale, bias[n:]])
        return torch.addmm(bias, x, weight.t())
    y = torch.addmm(bias, x, weight.t())
    y[:, :n] *= scale
    return y


class SelfAttention(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.scale = 1.0 / math.sqrt(args.d_model // args.n_heads)
        self.qkv = nn.Linear(args.d_model, 3 * args.d_model)
        self.proj = nn.Linear(args.d_model, args.d_model)
        self.attn_drop = nn.Dropout(args.dropout)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,T,D) -> q, k, v each (B,H,T,Dh)."""
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B,T,3D); sliced rather than split(): Split exports badly at ONNX opset 17
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        H = self.n_heads
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """y (B,H,T,Dh) -> (B,T,D) through the output projection."""
        B, H, T, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)  # (B,H,T,Dh)
        return self.merge(attend(q, k, v, blocked, self.scale, self.attn_drop))  # (B,T,D)


class CrossAttention(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.scale = 1.0 / math.sqrt(args.d_model // args.n_heads)
        self.q = nn.Linear(args.d_model, args.d_model)
        self.kv = nn.Linear(args.d_model, 2 * args.d_model)
        self.proj = nn.Linear(args.d_model, args.d_model)
        self.attn_drop = nn.Dropout(args.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B,S,D) -> k, v each (B,H,S,Dh); computed once per source by ``encode``."""
        B, S, D = memory.shape
        kv = self.kv(memory)  # (B,S,2D)
        k, v = kv[..., :D], kv[..., D:]
        k = k.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)
        v = v.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, src_blocked: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B,H,T,Dh)
        y = attend(q, k, v, src_blocked, self.scale, self.attn_drop)  # (B,H,T,Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.fc = nn.Linear(args.d_model, args.d_ff)
        self.out = nn.Linear(args.d_ff, args.d_model)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` at inference on rows x (B,D)."""
        return affine(F.gelu(affine(x, self.fc)), self.out)


class EncoderBlock(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(args.d_model)
        self.attn = SelfAttention(args)
        self.ln2 = nn.LayerNorm(args.d_model)
        self.ff = FeedForward(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, src_blocked: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), src_blocked))  # (B,S,D)
        return x + self.ff(self.ln2(x))


class DecoderBlock(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(args.d_model)
        self.self_attn = SelfAttention(args)
        self.ln2 = nn.LayerNorm(args.d_model)
        self.cross_attn = CrossAttention(args)
        self.ln3 = nn.LayerNorm(args.d_model)
        self.ff = FeedForward(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(
        self,
        x: torch.Tensor,
        self_blocked: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        src_blocked: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.ln1(x), self_blocked))  # (B,T,D)
        x = x + self.drop(self.cross_attn(self.ln2(x), cross_k, cross_v, src_blocked))
        return x + self.ff(self.ln3(x))

    def step(
        self,
        x: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        past_bias: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        src_bias: torch.Tensor,
        sources: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new token per row, the cross K/V of N = ``sources`` sources shared by B = N * G rows: rows
        n*G .. n*G+G-1 attend to source n, as G queries of one call (the beams of a request read their source's
        K/V once, not from G copies). The rows stay 2-D (no time axis): with T = 1 the heads transpose is a
        reshape of constant shape, and each linear layer exports as one Gemm with its bias, which keeps the
        step graph lean. Returns the new position's K/V only (the caller owns the cache and writes them into
        it). x (B,D), past_k/v (B,H,P,Dh), past_bias (B,1,1,P), cross_k/v (N,H,S,Dh), src_bias (N,1,1,S), the
        masks as ``blocked_bias`` -> x (B,D), new k/v (B,H,1,Dh)."""
        sa, ca = self.self_attn, self.cross_attn
        H, D = sa.n_heads, sa.proj.out_features
        Dh = D // H
        # q comes scaled by 1/sqrt(Dh) out of the projection; one reshape, then a select per q, k, v
        qkv = affine(self.ln1(x), sa.qkv, sa.scale, D).reshape(-1, 3, H, 1, Dh)  # (B,3,H,1,Dh)
        q, k, v = (qkv.select(1, j) for j in range(3))  # (B,H,1,Dh)
        y = attend_cached(q, k, v, past_k, past_v, past_bias)  # (B,H,1,Dh)
        x = x + affine(y.reshape(-1, D), sa.proj)  # (B,D)
        cq = affine(self.ln2(x), ca.q, ca.scale, D).reshape(sources, -1, H, Dh).transpose(1, 2)  # (N,H,G,Dh), scaled
        att = cq @ cross_k.transpose(-2, -1) + src_bias  # (N,H,G,S)
        y = F.softmax(att, dim=-1) @ cross_v  # (N,H,G,Dh)
        x = x + affine(y.transpose(1, 2).reshape(-1, D), ca.proj)  # (B,D)
        return x + self.ff.step(self.ln3(x)), k, v


class Seq2SeqTransformer(nn.Module):
    def __init__(self, args: Seq2SeqArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.d_model)  # shared: source, target and output (tied)
        self.embed_drop = nn.Dropout(args.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(args) for _ in range(args.n_encoder_layers)])
        self.enc_ln = nn.LayerNorm(args.d_model)
        self.decoder = nn.ModuleList([DecoderBlock(args) for _ in range(args.n_decoder_layers)])
        self.dec_ln = nn.LayerNorm(args.d_model)
        # inverse frequencies of the sinusoidal encoding; not persistent: derived from d_model
        inv_freq = torch.exp(torch.arange(0, args.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / args.d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- pieces shared by forward and the step API -------------------------------------------------------

    def positional(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (...) int64 -> sinusoidal encoding (..., D): [sin(p*f_0..), cos(p*f_0..)]."""
        angles = positions.unsqueeze(-1) * self.inv_freq  # (..., D/2): int64 * float promotes, no cast op
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (..., D)

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B,T) or (B,) -> (B,T,D) or (B,D); embeddings scaled by sqrt(D) as the weights are tied to the output."""
        x = self.embed(tokens) * math.sqrt(self.args.d_model) + self.positional(positions)
        return self.embed_drop(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> (..., V) through the final LayerNorm and the tied output projection."""
        return F.linear(self.dec_ln(h), self.embed.weight)

    # ---- public interfaces ----------------------------------------------------------------------------

    def memory(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        """src (B,S) int64, src_pad_mask (B,S) bool True = pad -> the encoder's output (B,S,D)."""
        positions = torch.ones_like(src).cumsum(1) - 1  # (B,S) 0..S-1, shape-generic for tracing
        x = self.embed_tokens(src, positions)  # (B,S,D)
        src_blocked = src_pad_mask[:, None, None, :]  # (B,1,1,S) keys that are padding
        for block in self.encoder:
            x = block(x, src_blocked)
        return self.enc_ln(x)  # (B,S,D)

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """src (B,S) int64, src_pad_mask (B,S) bool True = pad ->
        memory (B,S,D), cross_k (L,B,H,S,Dh), cross_v (L,B,H,S,Dh)."""
        memory, *kvs = self.encode_layers(src, src_pad_mask)
        return memory, torch.stack(kvs[0::2]), torch.stack(kvs[1::2])

    def encode_layers(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``encode`` with one cross K/V pair per decoder layer, as the serving graph ``encode`` returns them:
        memory (B,S,D), cross_k_0, cross_v_0, cross_k_1, ... each (B,H,S,Dh)."""
        memory = self.memory(src, src_pad_mask)
        return (memory, *[t for block in self.decoder for t in block.cross_attn.memory_kv(memory)])

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. src (B,S), tgt_in (B,T) int64, right-padded with pad_id -> logits (B,T,V)."""
        src_pad_mask = src.eq(self.args.pad_id)  # (B,S)
        _, cross_k, cross_v = self.encode(src, src_pad_mask)
        T = tgt_in.size(1)
        positions = torch.ones_like(tgt_in).cumsum(1) - 1  # (B,T)
        x = self.embed_tokens(tgt_in, positions)  # (B,T,D)
        future = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).triu(1)  # (T,T) True above diagonal
        # padded target keys only ever sit after the real tokens, so the causal mask already hides them from
        # real queries; masking them too keeps pad queries well defined (each still sees itself).
        pad_keys = tgt_in.eq(self.args.pad_id)[:, None, None, :] & ~torch.eye(T, dtype=torch.bool, device=tgt_in.device)
        self_blocked = future[None, None] | pad_keys  # (B,1,T,T)
        src_blocked = src_pad_mask[:, None, None, :]  # (B,1,1,S)
        for i, block in enumerate(self.decoder):
            x = block(x, self_blocked, cross_k[i], cross_v[i], src_blocked)
        return self.logits(x)  # (B,T,V)

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        src_pad_mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        past_pad_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder step with a key/value cache.

        tokens (B,1) int64, positions (B,) int64, cross_k/v (L,B,H,S,Dh), src_pad_mask (B,S) bool True = pad,
        past_k/v (L,B,H,P,Dh) (P may be 0), past_pad_mask (B,P) bool True = empty slot
        -> logits (B,V), present_k/v (L,B,H,P+1,Dh).
        """
        caches = [t[i] for i in range(len(self.decoder)) for t in (cross_k, cross_v, past_k, past_v)]
        logits, *new = self.decode_step_layers(tokens, positions, src_pad_mask, past_pad_mask, *caches)
        return logits, torch.cat([past_k, torch.stack(new[0::2])], 3), torch.cat([past_v, torch.stack(new[1::2])], 3)

    def decode_step_layers(self, tokens: torch.Tensor, positions: torch.Tensor, src_pad_mask: torch.Tensor,
                           past_pad_mask: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``decode_step`` with one cache tensor per layer, as the serving graph ``decode_step`` takes them (no
        step splits, copies or re-stacks a cache), and the cross K/V of N sources shared by B = N * G rows
        (``DecoderBlock.step``). tokens (B,1), positions (B,), src_pad_mask (N,S), past_pad_mask (B,P), then per
        layer i: cross_k_i, cross_v_i (N,H,S,Dh), past_k_i, past_v_i (B,H,P,Dh)
        -> logits (B,V), then per layer i: new_k_i, new_v_i (B,H,1,Dh), the K/V of this step's position (the
        caller appends them to its cache: the step never copies one)."""
        x = self.embed_tokens(tokens.select(1, 0), positions)  # (B,D)
        past_bias = blocked_bias(past_pad_mask, x.dtype)  # (B,1,1,P)
        src_bias = blocked_bias(src_pad_mask, x.dtype)  # (N,1,1,S)
        sources = caches[0].shape[0]  # N, read once: every layer's grouping reuses it
        new: list[torch.Tensor] = []
        for i, block in enumerate(self.decoder):
            cross_k, cross_v, past_k, past_v = caches[4 * i : 4 * i + 4]
            x, k, v = block.step(x, past_k, past_v, past_bias, cross_k, cross_v, src_bias, sources)
            new += [k, v]  # (B,H,1,Dh) each
        return (self.logits(x), *new)  # logits (B,V)

    def empty_cache(
        self, batch: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """past_k, past_v (L,B,H,0,Dh) and past_pad_mask (B,0) for the first decode step."""
        a = self.args
        shape = (a.n_decoder_layers, batch, a.n_heads, 0, a.d_model // a.n_heads)
        device = device or self.embed.weight.device
        dtype = self.embed.weight.dtype
        empty = torch.zeros(shape, dtype=dtype, device=device)
        return empty, empty.clone(), torch.zeros(batch, 0, dtype=torch.bool, device=device)


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, src: torch.Tensor, max_len: int, bos: int, eos: int) -> list[list[int]]:
    """Greedy decoding with the key/value cache. src (B,S) right-padded with ``pad_id``.

    Returns, per row, the generated ids without BOS and EOS (at most ``max_len`` of them).
    """
    B = src.size(0)
    device = src.device
    src_pad_mask = src.eq(model.args.pad_id)
    _, cross_k, cross_v = model.encode(src, src_pad_mask)
    past_k, past_v, past_pad = model.empty_cache(B, device)
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for step in range(max_len + 1):  # up to max_len tokens, then one more step that may emit EOS
        positions = torch.full((B,), step, dtype=torch.long, device=device)
        logits, past_k, past_v = model.decode_step(
            tokens, positions, cross_k, cross_v, src_pad_mask, past_k, past_v, past_pad
        )
        past_pad = torch.cat([past_pad, torch.zeros(B, 1, dtype=torch.bool, device=device)], dim=1)
        nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        out.append(nxt)
        done = done | nxt.eq(eos)
        if bool(done.all()):
            break
        tokens = nxt[:, None]
    ids = torch.stack(out, dim=1).tolist()  # (B, steps)
    result = []
    for row in ids:
        row = row[: row.index(eos)] if eos in row else row
        result.append(row[:max_len])
    return result
