"""Florence-2's task, markup and location tokens, and the ids Microsoft's processor gives them.

Microsoft's hub checkpoints (and fine-tunes saved the same way) ship BART's plain tokenizer: its 50,265
tokens and nothing of Florence-2's. Their `processing_florence2.py` adds Florence-2's 1,024 tokens when the
processor is built, as special tokens in one fixed order (`<od> </od> <ocr> </ocr>`, `<loc_0>` ... `<loc_999>`,
then the caption, grounding, segmentation and region markup), so they take the ids right after the
tokenizer's own (50265-51288 on BART's): the embedding rows the model was trained with. A tokenizer that
already holds some of them keeps their ids, as Microsoft's `add_special_tokens` does.

`complete_tokenizer` gives a tokenizer loaded from such a checkpoint the same tokens with the same ids, and
refuses a layout whose ids would not be the ones the model was trained with: one the model's vocabulary
cannot hold, or tokens already present out of Microsoft's order.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCATION_TOKENS = [f"<loc_{i}>" for i in range(1000)]
# Microsoft's order: the first four, the locations, then the rest (`desciption` is Microsoft's spelling).
FLORENCE_TOKENS = [
    "<od>", "</od>", "<ocr>", "</ocr>", *LOCATION_TOKENS,
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>",
    "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>",
    "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
]


class TokenLayoutError(ValueError):
    """The tokenizer cannot give Florence-2's tokens the ids the model was trained with; says which and why."""


@dataclass(frozen=True)
class TokenLayout:
    first_id: int  # the id of <od>
    added: int  # tokens the tokenizer lacked and now holds
    vocab_size: int  # the model's embedding rows


def planned_ids(vocab: dict[str, int], size: int) -> list[int]:
    """The id of each of FLORENCE_TOKENS once Microsoft's processor has added them to a tokenizer with this
    vocabulary (token -> id) and length: present tokens keep theirs, the others follow in order."""
    ids, next_id = [], size
    for token in FLORENCE_TOKENS:
        if token in vocab:
            ids.append(vocab[token])
        else:
            ids.append(next_id)
            next_id += 1
    return ids


def check_layout(vocab: dict[str, int], size: int, vocab_size: int) -> int:
    """The id of <od> under Microsoft's layout; TokenLayoutError when the ids would not be one run in
    Microsoft's order inside the model's `vocab_size` rows."""
    ids = planned_ids(vocab, size)
    first = ids[0]
    for offset, (token, token_id) in enumerate(zip(FLORENCE_TOKENS, ids)):
        if token_id != first + offset:
            raise TokenLayoutError(
                f"the tokenizer already holds {token} at id {token_id}, where Microsoft's processor's order puts "
                f"it at {first + offset} (right after <od> at {first}); this tokenizer was not saved by "
                "Microsoft's processor, and its ids would not be the rows the model was trained with")
    last = ids[-1]
    if last >= vocab_size:
        raise TokenLayoutError(
            f"the tokenizer holds {size} tokens, so Florence-2's {len(FLORENCE_TOKENS)} task and location tokens "
            f"would take ids {first}-{last}, past the model's vocabulary of {vocab_size} rows")
    return first


def complete_tokenizer(tokenizer, vocab_size: int) -> TokenLayout:
    """Add Florence-2's tokens to `tokenizer` (in place) as Microsoft's processor does, after checking the
    ids they get against the model's `vocab_size`."""
    vocab = tokenizer.get_vocab()
    first = check_layout(vocab, len(tokenizer), vocab_size)
    missing = [token for token in FLORENCE_TOKENS if token not in vocab]
    if missing:
        # The tokenizer's own extra special tokens stay (Microsoft's processor lists them first, too);
        # named ones such as the image placeholder are kept by the tokenizer apart from this list.
        extra = getattr(tokenizer, "extra_special_tokens", None)
        present = [token for token in extra if token not in FLORENCE_TOKENS] if isinstance(extra, list) else []
        tokenizer.add_special_tokens({"additional_special_tokens": present + FLORENCE_TOKENS})
    got = tokenizer.convert_tokens_to_ids(FLORENCE_TOKENS)
    expected = list(range(first, first + len(FLORENCE_TOKENS)))
    if got != expected:  # the tokenizer library did something else than Microsoft's processor
        wrong = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise TokenLayoutError(f"{FLORENCE_TOKENS[wrong]} got id {got[wrong]} instead of {expected[wrong]}")
    return TokenLayout(first_id=first, added=len(missing), vocab_size=vocab_size)
