"""One decoding step of every active request (mixed into DecodeEngine).

A step is one decoder forward over the live rows, the logits processors over all rows at once, then
each search's choice: greedy requests read their argmax, and every beam request of one width advances
in its BeamGroup with one set of tensor operations. The host reads back only the greedy tokens and, per
beam group, whether any member is done.
"""

from __future__ import annotations

import torch

from .logits import process
from .search import BeamGroup, GreedySearch


class Stepping:
    """Needs DecodeEngine's state: active, beam_groups, decoder, step_fn, the per-row tensors and _finish/_leave."""

    def _step(self, done) -> None:
        stopped = [a for a in self.active if a.request.should_stop and a.request.should_stop()]
        for active in stopped:
            active.outcome.cancelled = True
            self._leave(active, done)
        if not self.active:
            return
        active = self.active
        live = max(a.search.length for a in active)  # the longest row's tokens: later columns hold only pads
        if self.static_shapes:  # every row, the whole cache
            count, span, source_span = self.capacity, None, None
        else:
            count, span = max(a.rows[-1] for a in active) + 1, live
            source_span = max(a.source_length for a in active)
        greedy = [a for a in active if isinstance(a.search, GreedySearch)]
        beams = len(greedy) < len(active)
        tokens = self.sequences[:count].gather(1, (self.lengths[:count] - 1)[:, None])[:, 0]
        positions = self.lengths[:count] - 1
        with torch.inference_mode():
            logits = self.step_fn(tokens, positions, span, source_span)
            # Beam searches score log-probabilities, greedy ones the raw logits (as `generate` does).
            if beams and greedy:
                scores = torch.where(self.beam_rows[:count, None], torch.log_softmax(logits, dim=-1), logits)
            elif beams:
                scores = torch.log_softmax(logits, dim=-1)
            else:
                scores = logits
            seen = self.seen[:count] if any(a.request.generation.repetition_penalty != 1.0 for a in active) else None
            owing = any(a.search.length - 1 < a.request.generation.min_new_tokens for a in active)
            scores = process(scores, self.sequences[:count, :live], self.lengths[:count], seen, self.penalty[:count],
                             self.min_new[:count] if owing else None, self.max_length[:count], self.specials,
                             bos_due=any(a.search.length == 1 for a in active),
                             eos_due=any(a.search.length == a.request.generation.max_new_tokens for a in active))
            chosen = scores.argmax(dim=-1).tolist() if greedy else []
        finished = []
        for a in active:
            a.steps += 1
        new_tokens, new_rows = [], []
        for a in greedy:
            row = a.rows[0]
            new_rows.append(row)
            new_tokens.append(chosen[row])
            if a.search.advance(chosen[row]):
                finished.append(a)
        if beams:
            finished += self._step_beam_groups(scores, seen is not None)
        if new_rows:
            index = torch.tensor(new_rows, device=self.decoder.device)
            token_tensor = torch.tensor(new_tokens, device=self.decoder.device)
            self.sequences[index, self.lengths[index]] = token_tensor
            if seen is not None:
                self.seen[index, token_tensor] = True
            self.lengths[index] += 1
        for a in finished:
            self._finish(a)
            self._leave(a, done)

    def _step_beam_groups(self, scores: torch.Tensor, penalised: bool) -> list:
        """Every beam group's step; the active requests whose search is done (one host read for all groups)."""
        of_search = {id(a.search): a for a in self.active}
        members, done_flags = [], []
        for group in self.beam_groups.values():
            if group.members:
                self._step_beams(group, scores, penalised)
                members += [of_search[id(member)] for member in group.members]
                done_flags.append(group.done)
        flags = (done_flags[0] if len(done_flags) == 1 else torch.cat(done_flags)).tolist()
        return [a for a, is_done in zip(members, flags) if is_done]

    def _step_beams(self, group: BeamGroup, scores: torch.Tensor, penalised: bool) -> None:
        """One search step for every request of `group`, and its rows reordered to their parent beams: a
        fixed number of tensor operations, however many requests (issue #23)."""
        rows, count, beams = group.rows, len(group.members), group.beams
        # Members usually sit on one run of rows: a slice is a view, where an index list copies.
        at = rows if group.row_range is None else slice(*group.row_range)
        parents, _ = group.advance(scores[at].view(count, beams, -1))
        source = rows.view(count, beams).gather(1, parents).view(-1)
        # Cached positions before this step's token, for the longest member; a shorter member's rows also
        # take their parents' later positions, which no step reads before writing its own.
        cached = max(member.length for member in group.members) - 1
        self.decoder.copy_rows(at, source, cached)
        self.sequences[at, :group.width] = group.running.reshape(count * beams, group.width)
        if penalised:
            self.seen[at] = self.seen[source]
            new_tokens = group.running.gather(2, (group.cur - 1)[:, None, None].expand(count, beams, 1)).view(-1)
            self.seen[rows, new_tokens] = True
        self.lengths[at] = group.cur.repeat_interleave(beams)
