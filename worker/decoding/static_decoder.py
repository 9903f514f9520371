"""One decoding step of native Florence-2's BART decoder over a static, row-addressed KV cache.

transformers' `generate` spends most of a small model's step in Python: cache objects, mask building,
logits processors, stopping criteria. Here a step is the decoder's arithmetic and nothing else, on
tensors allocated once:

- `rows` decoding rows (a greedy request takes one, a beam request `num_beams`), each at its own
  position, so a request can join or leave between any two steps (iteration-level batching);
- self-attention keys/values `[layers, rows, heads, max_len, head_dim]`, written at each row's position
  and masked past it; cross-attention keys/values computed once per request from its encoder output;
- the same operations as transformers' eager BART attention (`q @ k^T * scaling + mask`, softmax, `@ v`,
  post-layer-norm), reading the model's own modules, so outputs are transformers' own up to the order of
  floating-point sums over masked (zero-weight) positions.

`step` has static shapes throughout, which is what `torch.compile` (and CUDA graphs with
mode="reduce-overhead") need; the eager path can attend over a shorter `span` of the cache instead.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticDecoder(nn.Module):
    def __init__(self, model, rows: int, max_len: int, max_source: int):
        super().__init__()
        language = model.model.language_model
        decoder = language.decoder
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.layernorm_embedding = decoder.layernorm_embedding
        self.layers = decoder.layers
        self.lm_head = model.lm_head
        first = self.layers[0].self_attn
        self.heads, self.head_dim, self.scaling = first.num_heads, first.head_dim, first.scaling
        self.rows, self.max_len, self.max_source = rows, max_len, max_source
        parameter = next(model.parameters())
        dtype, device = parameter.dtype, parameter.device
        self.mask_value = torch.finfo(dtype).min
        # [layers, rows * max_len, d_model]: one row-and-position index (row * max_len + position) writes a step.
        shape = (len(self.layers), rows * max_len, self.heads * self.head_dim)
        self.register_buffer("self_k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("self_v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        cross = (len(self.layers), rows, self.heads, max_source, self.head_dim)
        self.register_buffer("cross_k", torch.zeros(cross, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cross_v", torch.zeros(cross, dtype=dtype, device=device), persistent=False)
        self.register_buffer("cross_mask", torch.full((rows, 1, 1, max_source), self.mask_value, dtype=dtype,
                                                      device=device), persistent=False)
        self.register_buffer("columns", torch.arange(max_len, device=device), persistent=False)

    @property
    def device(self):
        return self.self_k.device

    @torch.no_grad()
    def reserve(self, rows: int, max_len: int, max_source: int) -> None:
        """Grow the caches (never shrink) to hold `rows` rows of `max_len` positions and `max_source` encoder
        positions, keeping what they hold. The eager path starts small and grows with the jobs it meets, so
        memory follows use; a compiled step needs its shapes fixed from the start."""
        rows, max_len, max_source = max(rows, self.rows), max(max_len, self.max_len), max(max_source, self.max_source)
        if (rows, max_len, max_source) == (self.rows, self.max_len, self.max_source):
            return
        layers, width = self.self_k.shape[0], self.self_k.shape[2]
        for name in ("self_k", "self_v"):
            old = getattr(self, name)
            grown = old.new_zeros(layers, rows * max_len, width)
            grown.view(layers, rows, max_len, width)[:, :self.rows, :self.max_len] = old.view(
                layers, self.rows, self.max_len, width)
            setattr(self, name, grown)
        for name in ("cross_k", "cross_v"):
            old = getattr(self, name)
            grown = old.new_zeros(layers, rows, self.heads, max_source, self.head_dim)
            grown[:, :self.rows, :, :self.max_source] = old
            setattr(self, name, grown)
        mask = self.cross_mask.new_full((rows, 1, 1, max_source), self.mask_value)
        mask[:self.rows, :, :, :self.max_source] = self.cross_mask
        self.cross_mask = mask
        self.columns = torch.arange(max_len, device=self.device)
        self.rows, self.max_len, self.max_source = rows, max_len, max_source

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """[n, length, d_model] -> [n, heads, length, head_dim]"""
        return states.view(states.shape[0], states.shape[1], self.heads, self.head_dim).transpose(1, 2)

    @torch.no_grad()
    def load_source(self, rows: torch.Tensor, encoder_states: torch.Tensor, source_mask: torch.Tensor) -> None:
        """Cross-attention keys/values of `encoder_states` [n, S, d] (mask [n, S]) into `rows` [n]."""
        length = encoder_states.shape[1]
        if length > self.max_source:
            raise ValueError(f"encoder output of {length} positions exceeds the decoder's {self.max_source}")
        for index, layer in enumerate(self.layers):
            attention = layer.encoder_attn
            self.cross_k[index, rows, :, :length] = self._heads(attention.k_proj(encoder_states))
            self.cross_v[index, rows, :, :length] = self._heads(attention.v_proj(encoder_states))
        additive = torch.full((rows.shape[0], self.max_source), self.mask_value, dtype=self.cross_mask.dtype,
                              device=self.device)
        additive[:, :length] = torch.where(source_mask.bool(), 0.0, self.mask_value).to(additive.dtype)
        self.cross_mask[rows] = additive[:, None, None, :]

    def _cached(self, cache: torch.Tensor, layer: int, rows: int, span: int) -> torch.Tensor:
        """[rows, heads, span, head_dim] view of a layer's self-attention cache."""
        grid = cache[layer].view(self.rows, self.max_len, self.heads, self.head_dim)
        return grid[:rows, :span].transpose(1, 2)

    @torch.no_grad()
    def copy_rows(self, destination: torch.Tensor, source: torch.Tensor, length: int) -> None:
        """Beam search reorder: rows `destination` take the first `length` cached positions of `source`."""
        for cache in (self.self_k, self.self_v):
            grid = cache.view(cache.shape[0], self.rows, self.max_len, -1)
            grid[:, destination, :length] = grid[:, source, :length]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, span: int | None = None,
                source_span: int | None = None) -> torch.Tensor:
        """Logits [n, vocab] (fp32) for one new token in each of the first n rows, at its position; the
        eager path may attend over the first `span` cached and `source_span` encoder positions only."""
        span = span or self.max_len
        source_span = source_span or self.max_source
        rows = tokens.shape[0]
        row_index = torch.arange(rows, device=tokens.device)
        hidden = self.embed_tokens(tokens[:, None])
        hidden = hidden + self.embed_positions.weight[positions + self.embed_positions.offset][:, None, :]
        hidden = self.layernorm_embedding(hidden)
        self_mask = torch.where(self.columns[None, :span] <= positions[:, None], 0.0, self.mask_value)
        self_mask = self_mask.to(hidden.dtype)[:, None, None, :]
        cross_mask = self.cross_mask[:rows, :, :, :source_span]
        slots = row_index * self.max_len + positions
        for index, layer in enumerate(self.layers):
            attention, cross = layer.self_attn, layer.encoder_attn
            residual = hidden
            query = self._heads(_linear(attention.q_proj, hidden))
            self.self_k[index].index_copy_(0, slots, _linear(attention.k_proj, hidden)[:, 0])
            self.self_v[index].index_copy_(0, slots, _linear(attention.v_proj, hidden)[:, 0])
            hidden = self._attend(query, self._cached(self.self_k, index, rows, span),
                                  self._cached(self.self_v, index, rows, span), self_mask, attention.out_proj)
            hidden = _norm(layer.self_attn_layer_norm, residual + hidden)
            residual = hidden
            hidden = self._attend(self._heads(_linear(cross.q_proj, hidden)), self.cross_k[index, :rows, :, :source_span],
                                  self.cross_v[index, :rows, :, :source_span], cross_mask, cross.out_proj)
            hidden = _norm(layer.encoder_attn_layer_norm, residual + hidden)
            residual = hidden
            hidden = _linear(layer.fc2, layer.activation_fn(_linear(layer.fc1, hidden)))
            hidden = _norm(layer.final_layer_norm, residual + hidden)
        return self.lm_head(hidden[:, 0]).float()

    def _attend(self, query, keys, values, mask, out_proj):
        weights = torch.matmul(query, keys.transpose(2, 3)) * self.scaling + mask
        output = torch.matmul(nn.functional.softmax(weights, dim=-1), values)
        return _linear(out_proj, output.transpose(1, 2).reshape(output.shape[0], 1, -1))


# nn.Linear / nn.LayerNorm's own functions on their own parameters, without the module call machinery
# (a step calls them a dozen times per layer).
def _linear(module: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(states, module.weight, module.bias)


def _norm(module: nn.LayerNorm, states: torch.Tensor) -> torch.Tensor:
    return nn.functional.layer_norm(states, module.normalized_shape, module.weight, module.bias, module.eps)
