"""The decode engine: native Florence-2 with iteration-level batching on a static KV cache.

Requests hold decoding rows (one greedy, `num_beams` for beam search). Every step runs all rows
through `StaticDecoder` at once; a request whose search is done leaves at once, freeing its rows, and a
waiting request is encoded and joins at the next step, instead of every row running to the longest
one. Each image goes through the vision tower once while its features are cached (keyed by the job's
image digest), so several tasks on one image share one encoding.

Outputs are transformers' `generate` outputs: the same logits processors (decoding/logits.py) and the
same search (decoding/search.py), verified token for token in tests/test_decode_engine.py.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
from PIL import Image

from florence2_serve.common.generation import MAX_NUM_BEAMS, GenerationSettings
from florence2_serve.common.tasks import Task

from ..engine import Florence2Engine
from ..inference import InferenceOutcome, InferenceRequest
from ..pixel_maker import PixelMaker
from .logits import Specials
from .search import BeamGroup, GreedySearch, GroupedBeam
from .static_decoder import StaticDecoder
from .stepping import Stepping

log = logging.getLogger(__name__)

IMAGE_CACHE_SIZE = 32
# Tokenized prompts kept: every task without text has one fixed prompt, so a busy worker tokenizes each once.
PROMPT_CACHE_SIZE = 256


@dataclass(eq=False)
class Active:
    request: InferenceRequest
    outcome: InferenceOutcome
    rows: list[int]
    source_length: int
    search: GreedySearch | GroupedBeam
    started: float
    preprocess_ms: float = 0.0
    steps: int = 0


@dataclass
class DecodeOptions:
    rows: int = 24
    compile: bool = False
    image_cache: int = IMAGE_CACHE_SIZE


class DecodeEngine(Stepping, Florence2Engine):
    """A Florence2Engine whose batches decode with iteration-level batching (run_batch or serve)."""

    continuous = True

    def __init__(self, loaded, options: DecodeOptions | None = None):
        super().__init__(loaded)
        self.options = options or DecodeOptions()
        model = loaded.model
        self.specials = Specials.of(model.generation_config)
        self.max_len = self.max_new_tokens_limit + 1
        self.image_tokens = loaded.processor.num_image_tokens
        self.full_source = self.image_tokens + self.max_text_tokens + 64
        # CUDA graphs need every shape and address fixed: with --compile on a GPU the caches are allocated at
        # their largest and every step runs all rows over the whole cache. Elsewhere (eager, or compiled with
        # dynamic shapes on CPU) a step covers only the live rows and positions, and the caches grow with use.
        self.static_shapes = self.options.compile and loaded.device.type == "cuda"
        # The most rows this engine grows to: always room for the widest beam search a request may ask.
        self.capacity = max(self.options.rows, MAX_NUM_BEAMS)
        if self.static_shapes:
            rows, length, source = self.capacity, self.max_len, self.full_source
        else:  # grown on demand (decoder.reserve): memory follows the jobs met so far
            rows, length, source = min(self.capacity, 4), 64, self.image_tokens + 64
        self.decoder = StaticDecoder(model, rows, length, source).eval()
        device = self.decoder.device
        self.vocab = model.config.text_config.vocab_size
        self.sequences = torch.full((rows, self.max_len), self.specials.pad, dtype=torch.long, device=device)
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.min_new = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_length = torch.full((rows,), self.max_len, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, self.vocab, dtype=torch.bool, device=device)
        self.beam_rows = torch.zeros(rows, dtype=torch.bool, device=device)
        self.free = list(range(rows))
        self.active: list[Active] = []
        self.beam_groups: dict[int, BeamGroup] = {}  # by beam width: their searches step together
        self.images: OrderedDict = OrderedDict()
        self.image_encodings = 0
        self.prompt_tokens: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_token_ids: torch.Tensor | None = None
        self.prompts_tokenized = 0
        self.steps_run = 0
        self.step_fn = self.decoder
        if self.static_shapes:
            self.step_fn = torch.compile(self.decoder, mode="reduce-overhead", dynamic=False, fullgraph=True)
        elif self.options.compile:
            self.step_fn = torch.compile(self.decoder, dynamic=True)

    # -- the Engine interface -----------------------------------------------------------------------

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        pending = deque(requests)
        outcomes: dict[int, InferenceOutcome] = {}

        def pull(free_rows: int, block: bool) -> list[InferenceRequest]:
            taken = []
            while pending and pending[0].generation.num_beams <= free_rows:
                request = pending.popleft()
                free_rows -= request.generation.num_beams
                taken.append(request)
            return taken

        def done(outcome: InferenceOutcome) -> None:
            outcomes[id(outcome.request)] = outcome

        self.serve(pull, done, until_idle=True)
        return [outcomes[id(r)] for r in requests]

    def serve(self, pull: Callable[[int, bool], list[InferenceRequest]], done: Callable[[InferenceOutcome], None],
              until_idle: bool = False) -> None:
        """Decode until `pull` gives nothing while no request is active (until_idle) or forever.

        pull(free_rows, block) -> requests that fit in free_rows; block=True when nothing is decoding.
        done(outcome) is called once per pulled request, as soon as it ends. pull returns None to stop
        (serve returns once the active requests have ended)."""
        while True:
            joining = pull(len(self.free) + self.capacity - self.decoder.rows, not self.active)
            if joining is None and not self.active:
                return  # the caller is stopping
            if joining:
                self._admit(joining, done)
            if not self.active:
                if until_idle and not joining:
                    return
                continue
            try:
                self._step(done)
                self.steps_run += 1
            except Exception:  # noqa: BLE001 - a failed step fails the jobs in it, never the worker
                log.exception("decoding step failed; failing its %d jobs", len(self.active))
                for active in list(self.active):
                    active.outcome.error = self._failure()
                    self._leave(active, done)

    # -- joining ------------------------------------------------------------------------------------

    def _admit(self, requests: list[InferenceRequest], done) -> None:
        started = time.perf_counter()
        ready = []
        for request in requests:
            outcome = InferenceOutcome(request)
            if request.should_stop and request.should_stop():
                outcome.cancelled = True
                done(outcome)
                continue
            error, prompt = self._check(request)
            if error is not None:
                outcome.error = error
                done(outcome)
                continue
            ready.append((request, outcome, prompt))
        if not ready:
            return
        try:
            states, masks, ends = self._encode([r for r, _, _ in ready], [p for _, _, p in ready])
        except Exception:  # noqa: BLE001 - one by one, so one bad request fails alone
            if len(ready) == 1:
                log.exception("encoding failed for job %s", ready[0][0].request_id)
                ready[0][1].error = self._failure()
                done(ready[0][1])
                return
            for request, _, _ in ready:
                self._admit([request], done)
            return
        preprocess_ms = (time.perf_counter() - started) * 1000
        self.generate_calls += 1
        self._reserve(sum(r.generation.num_beams for r, _, _ in ready),
                      max(1 + r.generation.max_new_tokens for r, _, _ in ready), states.shape[1])
        for index, (request, outcome, _) in enumerate(ready):
            beams = request.generation.num_beams
            self.free.sort()
            rows, self.free = self.free[:beams], self.free[beams:]  # the lowest rows: the step runs a prefix
            source_length = ends[index]  # through the last real token, whichever side pads
            self._load_rows(rows, request, states[index:index + 1, :source_length], masks[index:index + 1, :source_length])
            max_length = 1 + request.generation.max_new_tokens
            search = (self._beam_group(beams).join(max_length, rows) if beams > 1
                      else GreedySearch(max_length, self.specials))
            self.active.append(Active(request, outcome, rows, source_length, search, started,
                                      preprocess_ms))

    def _beam_group(self, beams: int) -> BeamGroup:
        group = self.beam_groups.get(beams)
        if group is None:
            group = self.beam_groups[beams] = BeamGroup(beams, self.specials, self.decoder.device)
        return group

    def _encode(self, requests: list[InferenceRequest], prompts: list[str]):
        """Encoder states [n, S, d] and masks [n, S] for the requests (image features from the cache), and
        where each request's text ends (known on the host: reading it from the device mask would wait for it)."""
        model = self.loaded.model
        device = self.decoder.device
        input_ids, mask, ends = self._tokens(prompts)
        input_ids, mask = input_ids.to(device), mask.to(device)
        features = self._image_features(requests)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(input_ids)
            placeholder = (input_ids == model.config.image_token_id)[..., None]
            embeds = embeds.masked_scatter(placeholder, features.to(embeds.dtype))
            states = model.model.language_model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return states, mask, ends

    def _tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """input_ids and attention_mask [n, L] of the encoder's text (image tokens, then the prompt), padded as
        the tokenizer pads a batch, and the end of each row's text. Each prompt is tokenized once while it stays
        in the cache, and without the image tokens (577 for base and large), which made tokenizing cost about
        0.9 ms a request on this thread."""
        processor = self.loaded.processor
        tokenizer = processor.tokenizer
        rows = []
        for prompt in prompts:
            tokens = self.prompt_tokens.get(prompt)
            if tokens is None:
                if self.image_token_ids is None:
                    self.image_token_ids = tokenizer(processor.image_token * self.image_tokens,
                                                     add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                # Special tokens split the text before it is tokenized: the prompt's tokens do not depend on
                # the image tokens before it, so only the short rest is tokenized for a new prompt.
                rest = tokenizer(tokenizer.bos_token + prompt + tokenizer.eos_token, add_special_tokens=False,
                                 return_tensors="pt")["input_ids"][0]
                tokens = torch.cat([self.image_token_ids, rest])
                self.prompts_tokenized += 1
                self.prompt_tokens[prompt] = tokens
                while len(self.prompt_tokens) > PROMPT_CACHE_SIZE:
                    self.prompt_tokens.popitem(last=False)
            else:
                self.prompt_tokens.move_to_end(prompt)
            rows.append(tokens)
        width = max(len(tokens) for tokens in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        ends = []
        for row, tokens in enumerate(rows):
            span = slice(width - len(tokens), width) if tokenizer.padding_side == "left" else slice(0, len(tokens))
            input_ids[row, span] = tokens
            mask[row, span] = 1
            ends.append(span.stop)
        return input_ids, mask, ends

    def _image_features(self, requests: list[InferenceRequest]) -> torch.Tensor:
        keys = [r.image_key or f"id:{id(r)}" for r in requests]
        first_of = {}
        for i, key in enumerate(keys):
            if key not in self.images:
                first_of.setdefault(key, i)
        missing = list(first_of.values())
        if missing:
            pixels = self._pixels([requests[i] for i in missing]).to(self.decoder.device, self.loaded.dtype)
            with torch.inference_mode():
                computed = self.loaded.model.get_image_features(pixel_values=pixels).pooler_output
            self.image_encodings += len(missing)
            for i, row in zip(missing, computed):
                self.images[keys[i]] = row
        for key in keys:
            self.images.move_to_end(key)
        features = torch.stack([self.images[key] for key in keys])
        for key in keys:
            if key.startswith("id:"):
                self.images.pop(key, None)
        while len(self.images) > self.options.image_cache:
            self.images.popitem(last=False)
        return features

    @property
    def pixel_processor(self):
        """The image processor whose output a request may bring along as `pixels` (worker/pixels.py)."""
        return self.loaded.processor.image_processor

    @cached_property
    def _pixel_maker(self) -> PixelMaker:
        return PixelMaker(self.pixel_processor)

    def _pixels(self, requests: list[InferenceRequest]) -> torch.Tensor:
        """Pixel values [n, 3, H, W]: those the requests bring, the processor's for the others."""
        return torch.stack([torch.as_tensor(r.pixels if r.pixels is not None else self._pixel_maker(r.image))
                            for r in requests])

    def _reserve(self, rows_needed: int, length: int, source: int) -> None:
        """Grow the decoder and the per-row state so that `rows_needed` more rows are free."""
        if self.static_shapes:
            return
        missing = rows_needed - len(self.free)
        rows = self.decoder.rows
        if missing > 0:
            rows = min(self.capacity, max(rows + missing, 2 * rows))
        self.decoder.reserve(rows, length, source)
        added = rows - self.sequences.shape[0]
        if added <= 0:
            return
        device = self.decoder.device

        def grow(tensor, fill):
            extra = torch.full((added, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=device)
            return torch.cat([tensor, extra])

        self.sequences = grow(self.sequences, self.specials.pad)
        self.lengths, self.penalty = grow(self.lengths, 1), grow(self.penalty, 1.0)
        self.min_new, self.max_length = grow(self.min_new, 0), grow(self.max_length, self.max_len)
        self.seen, self.beam_rows = grow(self.seen, False), grow(self.beam_rows, False)
        self.free.extend(range(rows - added, rows))

    def _load_rows(self, rows: list[int], request: InferenceRequest, states, mask) -> None:
        index = torch.tensor(rows, device=self.decoder.device)
        count = len(rows)
        with torch.inference_mode():
            self.decoder.load_source(index, states.expand(count, -1, -1), mask.expand(count, -1))
        settings = request.generation
        self.sequences[index] = self.specials.pad
        self.sequences[index, 0] = self.specials.start
        self.lengths[index] = 1
        self.penalty[index] = settings.repetition_penalty
        self.min_new[index] = settings.min_new_tokens
        self.max_length[index] = 1 + settings.max_new_tokens
        self.seen[index] = False
        self.seen[index, self.specials.start] = True
        self.beam_rows[index] = count > 1

    def _finish(self, active: Active) -> None:
        tokens = active.search.output()
        generate_ms = (time.perf_counter() - active.started) * 1000 - active.preprocess_ms
        try:
            active.outcome.result = self._result(active.request, tokens, active.preprocess_ms, generate_ms,
                                                 len(self.active))
        except Exception:  # noqa: BLE001 - a post-processing failure fails this request only
            log.exception("post-processing failed for job %s", active.request.request_id)
            active.outcome.error = self._failure()

    def _leave(self, active: Active, done) -> None:
        self.active.remove(active)
        if isinstance(active.search, GroupedBeam):
            active.search.group.leave(active.search)
        self.free.extend(active.rows)
        self.beam_rows[active.rows] = False
        self.last_decoding_steps = active.steps
        done(active.outcome)

    def use_eager(self) -> None:
        """Decode without the compiled step (after a compiler failure); the caches keep their shapes."""
        self.step_fn = self.decoder
        self.active.clear()
        self.free = list(range(self.decoder.rows))
        self.beam_rows[:] = False

    def warm_up(self, batch_sizes: tuple[int, ...]) -> float:
        """Compile (or just run) the step for the given numbers of simultaneous requests; seconds taken."""
        started = time.perf_counter()
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        for size in batch_sizes:
            settings = GenerationSettings(num_beams=1, max_new_tokens=2)
            outcomes = self.run_batch([InferenceRequest(image, Task.CAPTION, generation=settings) for _ in range(size)])
            if any(outcome.error is not None for outcome in outcomes):
                raise RuntimeError("the warm-up batch failed (the worker's log has the step's error)")
        self.images.clear()
        return time.perf_counter() - started
