"""Search state: greedy per request, and beam search exactly as transformers' (v5) `_beam_search` runs it
for a batch of one, kept for all requests of one beam width together (BeamGroup).

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


class BeamGroup:
    """transformers' beam search (v5 `_beam_search`, a batch of one) for every running request of one beam
    width at once: one set of tensor operations per step, however many requests. Request r's state is row r
    of each tensor; its running beams' tokens are `running[r, :, :length]`. Where transformers keeps every
    beam's history of parent indices, only two things of it are ever read: this step's parents (to reorder
    the cache) and, for a finished beam, how many tokens it generated; so those are what is kept.
    Requests join (`join`) and leave (`leave`) between steps.

    Every number is computed as the one-request search computes it, element by element (the divisors from
    the same Python floats), and a request's finished beams change only in steps where one of its own beams
    finished, so each request's tokens are those it would get alone."""

    def __init__(self, beams: int, specials: Specials, device):
        self.beams, self.specials, self.device = beams, specials, device
        self.keep = 2 * beams  # max(2, 1 + number of EOS tokens) * beams, with one EOS token
        self.top_mask = torch.arange(self.keep, device=device) < beams
        self.members: list[GroupedBeam] = []
        self.width = 0  # the longest member's max_length: the tensors' last dimension
        self.running = self.finished = torch.zeros((0, beams, 0), dtype=torch.long, device=device)
        self.running_scores = self.finished_scores = torch.zeros((0, beams), device=device)
        self.finished_lengths = torch.zeros((0, beams), dtype=torch.long, device=device)
        self.is_finished = torch.zeros((0, beams), dtype=torch.bool, device=device)
        self.improvable = torch.zeros((0,), dtype=torch.bool, device=device)
        self.done = torch.zeros((0,), dtype=torch.bool, device=device)  # the last step's, per member
        # Each member's length on the device; GroupedBeam.length is the same on the host, for the engine.
        self.cur = torch.zeros((0,), dtype=torch.long, device=device)
        self.max_lengths = torch.zeros((0,), dtype=torch.long, device=device)
        self.rows = torch.zeros((0,), dtype=torch.long, device=device)  # the members' cache rows, in order
        self.row_list: list[int] = []  # the same on the host
        self.row_range: tuple[int, int] | None = None  # (first, end) when the rows are one ascending run
        self.far = torch.tensor(FAR, device=device)

    def join(self, max_length: int, rows: list[int]) -> "GroupedBeam":
        """A new request, decoding on cache rows `rows` (one per beam)."""
        specials, beams, device = self.specials, self.beams, self.device
        if max_length > self.width:
            grow = max_length - self.width
            self.running = torch.nn.functional.pad(self.running, (0, grow), value=specials.pad)
            self.finished = torch.nn.functional.pad(self.finished, (0, grow), value=specials.pad)
            self.width = max_length
        running = torch.full((1, beams, self.width), specials.pad, dtype=torch.long, device=device)
        running[:, :, 0] = specials.start
        scores = torch.zeros((1, beams), device=device)
        scores[:, 1:] = FAR
        self.running = torch.cat((self.running, running))
        self.running_scores = torch.cat((self.running_scores, scores))
        self.finished = torch.cat((self.finished, running.clone()))
        self.finished_scores = torch.cat((self.finished_scores, torch.full((1, beams), FAR, device=device)))
        self.finished_lengths = torch.cat((self.finished_lengths,
                                           torch.zeros((1, beams), dtype=torch.long, device=device)))
        self.is_finished = torch.cat((self.is_finished, torch.zeros((1, beams), dtype=torch.bool, device=device)))
        self.improvable = torch.cat((self.improvable, torch.ones((1,), dtype=torch.bool, device=device)))
        self.cur = torch.cat((self.cur, torch.ones((1,), dtype=torch.long, device=device)))
        self.max_lengths = torch.cat((self.max_lengths, torch.tensor([max_length], device=device)))
        self._set_rows(self.row_list + rows)
        member = GroupedBeam(self, len(self.members))
        self.members.append(member)
        return member

    def leave(self, member: "GroupedBeam") -> None:
        keep = [m.slot for m in self.members if m is not member]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for name in ("running", "running_scores", "finished", "finished_scores", "finished_lengths", "is_finished",
                     "improvable", "cur", "max_lengths"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        beams = self.beams
        self._set_rows([row for slot in keep for row in self.row_list[slot * beams:(slot + 1) * beams]])
        self.members = [m for m in self.members if m is not member]
        for slot, m in enumerate(self.members):
            m.slot = slot

    def _set_rows(self, rows: list[int]) -> None:
        self.row_list = rows
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        contiguous = bool(rows) and rows == list(range(rows[0], rows[0] + len(rows)))
        self.row_range = (rows[0], rows[0] + len(rows)) if contiguous else None

    def advance(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_probs [members, beams, vocab], already processed, members in `self.members` order. Returns
        (parent beam per running beam [members, beams], done [members]); the caller reads `done` once per
        step."""
        members, beams, specials = self.members, self.beams, self.specials
        count, vocab, width = len(members), log_probs.shape[2], self.width
        cur = self.cur
        top_scores, top_indices = torch.topk((log_probs + self.running_scores[:, :, None]).view(count, -1),
                                             k=self.keep)
        parents = torch.div(top_indices, vocab, rounding_mode="floor")
        candidates = self.running.gather(1, parents[:, :, None].expand(count, self.keep, width))
        tokens = top_indices % vocab
        candidates.scatter_(2, cur[:, None, None].expand(count, self.keep, 1), tokens[:, :, None])
        hits = (tokens == specials.eos) | (cur + 1 >= self.max_lengths)[:, None]

        running_scores = top_scores + hits.float() * FAR
        chosen = torch.topk(running_scores, k=beams)[1]
        self.running = candidates.gather(1, chosen[:, :, None].expand(count, beams, width))
        self.running_scores = running_scores.gather(1, chosen)

        just_finished = hits & self.top_mask
        if bool(just_finished.any()):  # one read for the whole group; else every member's finished stay as they are
            self._merge_finished(candidates, top_scores, just_finished, cur, self._powers(cur))

        for m in members:
            m.length += 1
        self.cur = cur = cur + 1
        if specials.early_stopping == "never" and specials.length_penalty > 0.0:
            hypothetical = self.max_lengths - 1
        else:
            hypothetical = cur - 1
        best_running = self.running_scores[:, :1] / self._powers(hypothetical)[:, None]
        lowest = self.finished_scores.min(dim=1, keepdim=True).values
        worst_finished = torch.where(self.is_finished, lowest, self.far)
        self.improvable = self.improvable & (best_running > worst_finished).any(dim=1)
        open_beam = ~(self.is_finished.all(dim=1) & (specials.early_stopping is True))
        self.done = ~(self.improvable & open_beam & ~hits.all(dim=1))
        return parents.gather(1, chosen), self.done

    def _powers(self, lengths: torch.Tensor) -> torch.Tensor:
        """length ** length_penalty per member, as the one-request search divides by it: a Python float
        rounded to float32 (exactly the length itself at the default penalty of 1)."""
        penalty = self.specials.length_penalty
        if penalty == 1.0:
            return lengths.float()
        return torch.tensor([length ** penalty for length in lengths.tolist()], device=self.device)

    def _merge_finished(self, candidates, top_scores, just_finished, cur, divisor) -> None:
        """Each request keeps the best `beams` of its finished beams and its candidates that just finished;
        a request none of whose candidates just finished keeps its finished beams as they are."""
        count, beams, width = candidates.shape[0], self.beams, self.width
        scores = top_scores / divisor[:, None]  # cur tokens generated, the start excluded
        full = self.is_finished.all(dim=1) & (self.specials.early_stopping is True)
        scores = (scores + full[:, None].float() * FAR + (~self.improvable)[:, None].float() * FAR
                  + (~just_finished).float() * FAR)
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=beams)[1]
        merging = just_finished.any(dim=1)
        finished = torch.cat((self.finished, candidates), dim=1).gather(1, best[:, :, None].expand(count, beams, width))
        generated = cur[:, None].expand(count, candidates.shape[1])
        self.finished = torch.where(merging[:, None, None], finished, self.finished)
        self.finished_scores = torch.where(merging[:, None], merged_scores.gather(1, best), self.finished_scores)
        self.finished_lengths = torch.where(
            merging[:, None], torch.cat((self.finished_lengths, generated), dim=1).gather(1, best),
            self.finished_lengths)
        self.is_finished = torch.where(merging[:, None], torch.cat((self.is_finished, just_finished), dim=1)
                                       .gather(1, best), self.is_finished)


class GroupedBeam:
    """One request's place in its BeamGroup: what the engine reads of its search."""

    def __init__(self, group: BeamGroup, slot: int):
        self.group, self.slot = group, slot
        self.beams = group.beams
        self.length = 1

    def output(self) -> list[int]:
        group = self.group
        return group.finished[self.slot, 0, :1 + int(group.finished_lengths[self.slot, 0])].tolist()
