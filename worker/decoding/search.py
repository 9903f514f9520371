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

    def __init__(self, max_length: int, specials: Specials):
        self.max_length, self.specials = max_length, specials
        self.tokens = [specials.start]

    @property
    def length(self) -> int:
        return len(self.tokens)

    def advance(self, chosen: int) -> bool:
        """Append the step's argmax token; whether the request is done (EOS, or its length reached)."""
        self.tokens.append(chosen)
        return chosen == self.specials.eos or len(self.tokens) >= self.max_length

    def output(self) -> list[int]:
        return self.tokens


class BeamSearch:
    """transformers' beam search for one request. Where transformers keeps every beam's history of parent
    indices, only two things of it are ever read: this step's parents (to reorder the cache) and, for a
    finished beam, how many tokens it generated; so those are what is kept."""

    def __init__(self, beams: int, max_length: int, specials: Specials, device):
        self.beams, self.max_length, self.specials = beams, max_length, specials
        self.keep = 2 * beams  # max(2, 1 + number of EOS tokens) * beams, with one EOS token
        self.top_mask = torch.arange(self.keep, device=device) < beams
        self.running = torch.full((beams, max_length), specials.pad, dtype=torch.long, device=device)
        self.running[:, 0] = specials.start
        self.running_scores = torch.zeros(beams, device=device)
        self.running_scores[1:] = FAR
        self.finished = self.running.clone()
        self.finished_scores = torch.full((beams,), FAR, device=device)
        self.finished_lengths = torch.zeros(beams, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(beams, dtype=torch.bool, device=device)
        self.improvable = torch.ones((), dtype=torch.bool, device=device)
        self.far = torch.tensor(FAR, device=device)
        self.length = 1

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_probs [beams, vocab], already processed. Returns (parent row per running beam, done), `done` a
        0-d bool tensor the caller reads once per step; the running beams' tokens are `running[:, :length]`."""
        cur, vocab = self.length, log_probs.shape[1]
        top_scores, top_indices = torch.topk((log_probs + self.running_scores[:, None]).view(-1), k=self.keep)
        parents = torch.div(top_indices, vocab, rounding_mode="floor")
        candidates = self.running[parents]
        candidates[:, cur] = top_indices % vocab
        hits = candidates[:, cur] == self.specials.eos
        if cur + 1 >= self.max_length:
            hits = torch.ones_like(hits)

        running_scores = top_scores + hits.float() * FAR
        chosen = torch.topk(running_scores, k=self.beams)[1]
        self.running = candidates[chosen]
        self.running_scores = running_scores[chosen]

        just_finished = hits & self.top_mask
        if bool(just_finished.any()):  # else the merge keeps the finished beams as they are
            self._merge_finished(candidates, top_scores, just_finished, cur)

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
        return parents[chosen], done

    def _merge_finished(self, candidates, top_scores, just_finished, cur: int) -> None:
        """Keep the best `beams` of the finished beams and the candidates that just finished."""
        scores = top_scores / (cur ** self.specials.length_penalty)  # cur tokens generated, the start excluded
        full = self.is_finished.all() & (self.specials.early_stopping is True)
        scores = scores + full.float() * FAR + (~self.improvable).float() * FAR + (~just_finished).float() * FAR
        merged_scores = torch.cat((self.finished_scores, scores))
        best = torch.topk(merged_scores, k=self.beams)[1]
        self.finished = torch.cat((self.finished, candidates))[best]
        self.finished_scores = merged_scores[best]
        generated = torch.full((candidates.shape[0],), cur, dtype=torch.long, device=candidates.device)
        self.finished_lengths = torch.cat((self.finished_lengths, generated))[best]
        self.is_finished = torch.cat((self.is_finished, just_finished))[best]

    def output(self) -> list[int]:
        return self.finished[0, :1 + int(self.finished_lengths[0])].tolist()
