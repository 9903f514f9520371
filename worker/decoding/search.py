"""Per-request search state: greedy, or beam search exactly as transformers' (v5) `_beam_search` runs it
for a batch of one.

A batch of several requests in transformers is, request for request, the same computation as each
request alone (a finished request's beams keep stepping but can no longer change its result), so running
each request's search on its own rows lets requests join and leave the decoding batch at any step
without changing any request's output.
"""

from __future__ import annotations

import torch

from .logits import Specials

FAR = -1.0e9  # transformers' "very large negative" score


class GreedySearch:
    beams = 1

    def __init__(self, max_length: int, specials: Specials, device):
        self.max_length, self.specials = max_length, specials
        self.tokens = [specials.start]

    @property
    def length(self) -> int:
        return len(self.tokens)

    def advance(self, scores: torch.Tensor, chosen: int) -> tuple[list[int], list[int], bool]:
        """(parent row per running row, next token per running row, finished)."""
        self.tokens.append(chosen)
        done = chosen == self.specials.eos or len(self.tokens) >= self.max_length
        return [0], [chosen], done

    def output(self) -> list[int]:
        return self.tokens


class BeamSearch:
    def __init__(self, beams: int, max_length: int, specials: Specials, device):
        self.beams, self.max_length, self.specials = beams, max_length, specials
        self.keep = 2 * beams  # max(2, 1 + number of EOS tokens) * beams, with one EOS token
        self.top_mask = torch.arange(self.keep, device=device) < beams
        self.running = torch.full((beams, max_length), specials.pad, dtype=torch.long, device=device)
        self.running[:, 0] = specials.start
        self.running_scores = torch.zeros(beams, device=device)
        self.running_scores[1:] = FAR
        self.running_indices = torch.full((beams, max_length - 1), -1, dtype=torch.long, device=device)
        self.finished = self.running.clone()
        self.finished_scores = torch.full((beams,), FAR, device=device)
        self.finished_indices = self.running_indices.clone()
        self.is_finished = torch.zeros(beams, dtype=torch.bool, device=device)
        self.improvable = torch.ones((), dtype=torch.bool, device=device)
        self.far = torch.tensor(FAR, device=device)
        self.length = 1

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log_probs [beams, vocab], already processed. Returns (parent row per running beam, next token per
        running beam, done) as tensors; `done` is a 0-d bool tensor, read once per step by the caller."""
        cur, vocab = self.length, log_probs.shape[1]
        accumulated = (log_probs + self.running_scores[:, None]).reshape(1, -1)
        top_scores, top_indices = torch.topk(accumulated, k=self.keep)
        top_scores, top_indices = top_scores[0], top_indices[0]
        parents = torch.div(top_indices, vocab, rounding_mode="floor")
        tokens = top_indices % vocab
        candidates = self.running[parents]
        candidates[:, cur] = tokens
        candidate_indices = self.running_indices[parents]
        candidate_indices[:, cur - 1] = parents
        hits = (tokens == self.specials.eos) | (cur + 1 >= self.max_length)

        running_scores = top_scores + hits.float() * FAR
        chosen = torch.topk(running_scores, k=self.beams)[1]
        self.running = candidates[chosen]
        self.running_scores = running_scores[chosen]
        self.running_indices = candidate_indices[chosen]

        just_finished = hits & self.top_mask
        if bool(just_finished.any()):  # else the merge keeps the finished beams as they are
            self._merge_finished(candidates, candidate_indices, top_scores, just_finished, cur)

        self.length = cur = cur + 1
        penalty = self.specials.length_penalty
        if self.specials.early_stopping == "never" and penalty > 0.0:
            hypothetical = self.max_length - 1
        else:
            hypothetical = cur - 1
        best_running = self.running_scores[:1] / (hypothetical ** penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), self.far)
        self.improvable = self.improvable & (best_running > worst_finished).any()
        open_beam = ~(self.is_finished.all() & (self.specials.early_stopping is True))
        done = ~(self.improvable & open_beam & ~hits.all())
        return self.running_indices[:, cur - 2], self.running[:, cur - 1], done

    def _merge_finished(self, candidates, candidate_indices, top_scores, just_finished, cur: int) -> None:
        """Keep the best `beams` of the finished beams and the candidates that just finished."""
        scores = top_scores / ((cur + 1 - 1) ** self.specials.length_penalty)
        full = self.is_finished.all() & (self.specials.early_stopping is True)
        scores = scores + full.float() * FAR + (~self.improvable).float() * FAR + (~just_finished).float() * FAR
        merged_scores = torch.cat((self.finished_scores, scores))
        best = torch.topk(merged_scores, k=self.beams)[1]
        self.finished = torch.cat((self.finished, candidates))[best]
        self.finished_scores = merged_scores[best]
        self.finished_indices = torch.cat((self.finished_indices, candidate_indices))[best]
        self.is_finished = torch.cat((self.is_finished, just_finished))[best]

    def output(self) -> list[int]:
        generated = int((self.finished_indices[0] + 1).bool().sum())
        return self.finished[0, :1 + generated].tolist()
