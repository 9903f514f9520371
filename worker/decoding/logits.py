"""transformers' logits processors for Florence-2's generation, on all rows at once and on the device.

The same rules, in the same order, as `GenerationMixin._get_logits_processor` builds them for our
settings: repetition penalty, no-repeat n-grams, min new tokens, forced BOS, forced EOS. Each row has
its own request's settings and length; nothing here reads a tensor back to the host, so a step costs no
synchronisation (transformers' no-repeat n-gram processor walks every row's n-grams in Python).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Specials:
    """The model's generation config, as the processors need it."""

    eos: int
    pad: int
    start: int
    forced_bos: int | None
    forced_eos: int | None
    no_repeat_ngram: int
    early_stopping: bool | str
    length_penalty: float

    @classmethod
    def of(cls, generation_config) -> "Specials":
        eos = generation_config.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError("the decode engine supports one EOS token")
            eos = eos[0]
        return cls(eos=eos, pad=generation_config.pad_token_id if generation_config.pad_token_id is not None else eos,
                   start=generation_config.decoder_start_token_id, forced_bos=generation_config.forced_bos_token_id,
                   forced_eos=generation_config.forced_eos_token_id,
                   no_repeat_ngram=generation_config.no_repeat_ngram_size or 0,
                   early_stopping=generation_config.early_stopping if generation_config.early_stopping is not None
                   else False,
                   length_penalty=generation_config.length_penalty if generation_config.length_penalty is not None
                   else 1.0)


def process(scores: torch.Tensor, sequences: torch.Tensor, lengths: torch.Tensor, seen: torch.Tensor | None,
            penalty: torch.Tensor, min_new: torch.Tensor | None, max_length: torch.Tensor, specials: Specials,
            bos_due: bool = True, eos_due: bool = True) -> torch.Tensor:
    """scores [rows, vocab]; sequences [rows, T] (decoder start at 0), lengths [rows] = tokens so far.

    The caller, which knows every row's length, may skip what cannot apply this step: `seen` None (no
    repetition penalty), `min_new` None (no row still owes tokens), `bos_due` / `eos_due` False (no row
    at its first / last step)."""
    negative = -float("inf")
    if seen is not None:
        penalised = torch.where(scores < 0, scores * penalty[:, None], scores / penalty[:, None])
        scores = torch.where(seen, penalised, scores)
    if specials.no_repeat_ngram:
        scores = scores.masked_fill(banned_ngrams(sequences, lengths, specials.no_repeat_ngram, scores.shape[1]),
                                    negative)
    if min_new is not None:
        early = lengths - 1 < min_new
        scores[:, specials.eos] = torch.where(early, negative, scores[:, specials.eos])
    for token, due, at in ((specials.forced_bos, bos_due, lambda: lengths == 1),
                           (specials.forced_eos, eos_due, lambda: lengths == max_length - 1)):
        if token is not None and due:
            forced = torch.full_like(scores, negative)
            forced[:, token] = 0
            scores = torch.where(at()[:, None], forced, scores)
    return scores


def banned_ngrams(sequences: torch.Tensor, lengths: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] True where a token would repeat an n-gram already in the row's sequence."""
    rows, total = sequences.shape
    if total < n:
        return torch.zeros(rows, vocab, dtype=torch.bool, device=sequences.device)
    windows = sequences.unfold(1, n, 1)  # [rows, total - n + 1, n]
    starts = torch.arange(windows.shape[1], device=sequences.device)
    complete = starts[None, :] + n <= lengths[:, None]  # the window lies within the row's tokens
    # Clamped to the columns given: a free row may still hold a longer length than the live columns it was
    # given (its bans are garbage and never read).
    offsets = torch.arange(n - 1, device=sequences.device)[None, :]
    tail_index = (lengths[:, None] - (n - 1) + offsets).clamp(0, total - 1)
    tail = sequences.gather(1, tail_index)  # the row's last n-1 tokens
    match = complete & (windows[:, :, :-1] == tail[:, None, :]).all(dim=-1)
    match &= (lengths[:, None] + 1 >= n)  # transformers bans nothing before the row has n-1 tokens
    counts = torch.zeros(rows, vocab, dtype=torch.int32, device=sequences.device)
    counts.scatter_add_(1, windows[:, :, -1], match.to(torch.int32))
    return counts > 0
