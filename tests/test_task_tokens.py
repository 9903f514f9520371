"""Florence-2's tokens given the ids Microsoft's processor gives them, or a clear refusal."""

import pytest

from florence2_serve.worker.task_tokens import FLORENCE_TOKENS, TokenLayoutError, check_layout, planned_ids

BART = 50265  # BART's tokenizer: 50,265 tokens, <mask> last


def _plain(size: int = BART) -> dict[str, int]:
    return {f"tok{i}": i for i in range(size - 1)} | {"<mask>": size - 1}


def test_microsofts_order_and_count():
    assert len(FLORENCE_TOKENS) == 1024 and len(set(FLORENCE_TOKENS)) == 1024
    assert FLORENCE_TOKENS[:5] == ["<od>", "</od>", "<ocr>", "</ocr>", "<loc_0>"]
    assert FLORENCE_TOKENS[1003] == "<loc_999>" and FLORENCE_TOKENS[1004] == "<cap>"
    assert FLORENCE_TOKENS[-1] == "<and>" and "<region_to_desciption>" in FLORENCE_TOKENS


def test_the_hubs_plain_tokenizer_gets_the_trained_rows():
    ids = planned_ids(_plain(), BART)
    assert ids[0] == 50265 and ids[-1] == 51288
    assert ids[FLORENCE_TOKENS.index("<loc_100>")] == 50369  # the id the issue quotes
    assert check_layout(_plain(), BART, 51289) == 50265


def test_a_tokenizer_saved_with_the_tokens_keeps_them():
    vocab = _plain() | {token: BART + i for i, token in enumerate(FLORENCE_TOKENS)}
    assert check_layout(vocab, BART + 1024, 51289) == 50265
    assert planned_ids(vocab, BART + 1024) == list(range(50265, 51289))


def test_tokens_past_the_models_vocabulary_are_refused():
    vocab = _plain() | {"<my_token>": BART}  # a fine-tune added a token of its own but kept 51,289 rows
    with pytest.raises(TokenLayoutError, match=r"ids 50266-51289, past the model's vocabulary of 51289 rows"):
        check_layout(vocab, BART + 1, 51289)
    assert check_layout(vocab, BART + 1, 51290) == 50266  # the embedding grew with it: fine


def test_tokens_present_out_of_microsofts_order_are_refused():
    vocab = _plain() | {"<loc_0>": BART, "<loc_1>": BART + 1}  # added by another tool, in another order
    with pytest.raises(TokenLayoutError, match=r"already holds <loc_0> at id 50265, where .* puts it at 50271.*not saved by Microsoft's processor"):
        check_layout(vocab, BART + 2, 60000)
    partial = _plain() | {"<od>": BART}  # one token present where Microsoft's puts it: the rest follow
    assert check_layout(partial, BART + 1, 51289) == 50265


def test_the_converter_refuses_a_tokenizer_that_would_misplace_them(remote_code_dir, tmp_path):
    import json
    import shutil

    from florence2_serve.worker.conversion import ConversionError, convert_checkpoint

    odd = tmp_path / "odd"
    shutil.copytree(remote_code_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["text_config"]["vocab_size"] -= 1  # one embedding row short of the tokens the processor adds
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="tokenizer: .*past the model's vocabulary"):
        convert_checkpoint(odd, tmp_path / "out")
