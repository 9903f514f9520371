"""Microsoft-format checkpoints converted to native Florence-2: equality with the original, errors, cache.

The original side runs the Microsoft-format fixture by its own code in a subprocess, on the legacy
transformers line (`.legacy/`) where it is installed, and the native side runs here on the current one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import REPO, python_env
from florence2_serve.worker.conversion import (
    ConversionError, checkpoint_format, convert_checkpoint, convert_state_dict, native_key, read_state_dict,
)
from florence2_serve.worker.conversion_cache import checkpoint_digest, ensure_converted
from florence2_serve.worker.loader import LoadOptions, inspect_checkpoint, load_model

TESTS = Path(__file__).parent


def _legacy_path() -> Path | None:
    path = Path(os.environ.get("FLORENCE2_LEGACY_SITE", REPO / ".legacy"))
    if (path / "transformers").is_dir():
        return path
    assert not os.environ.get("CI"), f"CI must compare against the legacy line: .ci/setup installs {path}"
    return None


@pytest.fixture(scope="module")
def reference(remote_code_dir, tmp_path_factory):
    """The Microsoft-format fixture's inputs and outputs, computed by its own code (legacy line if present)."""
    out = tmp_path_factory.mktemp("reference") / "outputs.pt"
    legacy = _legacy_path()
    env = python_env(HF_HUB_OFFLINE=1, **({"PYTHONPATH": legacy} if legacy else {}))
    result = subprocess.run([sys.executable, str(TESTS / "florence2_outputs.py"), str(remote_code_dir), str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(out, weights_only=True)
    outputs["transformers"] = "legacy" if legacy else "current"
    return outputs


@pytest.fixture(scope="module")
def converted(remote_code_dir, tmp_path_factory):
    """The fixture as a worker loads it: converted on load into a cache, served natively."""
    cache = tmp_path_factory.mktemp("convert-cache")
    return load_model(str(remote_code_dir), LoadOptions(device="cpu", convert_cache=str(cache))), cache


def _replayed(converted, reference):
    from florence2_outputs import replay

    loaded, _ = converted
    return replay(loaded.model, reference, loaded.model.config.image_token_id, loaded.processor.num_image_tokens)


def test_a_microsoft_checkpoint_loads_as_native_without_its_code(converted):
    loaded, cache = converted
    assert (loaded.kind, loaded.source_format, loaded.converted) == ("native", "microsoft", True)
    assert type(loaded.model).__module__.startswith("transformers.models.florence2")
    (copy,) = [p for p in cache.iterdir() if p.is_dir()]
    config = json.loads((copy / "config.json").read_text())
    assert config["model_type"] == "florence2" and "auto_map" not in config
    assert not list(copy.glob("*.py")), "the native copy must not carry remote code"
    generation = json.loads((copy / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("num_beams", "no_repeat_ngram_size", "forced_bos_token_id",
                                       "forced_eos_token_id", "early_stopping")} == {
        "num_beams": 3, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
        "early_stopping": True}


def test_converted_model_generates_the_same_tokens_and_logits(converted, reference):
    """Three images x four tasks, greedy and beams 3: identical tokens; logits equal within fp32 tolerance."""
    native = _replayed(converted, reference)
    assert len(reference["cases"]) == 12
    for original, mine in zip(reference["cases"], native["cases"], strict=True):
        where = f"image {original['image']} {original['task']} ({reference['transformers']} transformers)"
        assert mine["greedy"] == original["greedy"], where
        assert mine["beams"] == original["beams"], where
        torch.testing.assert_close(mine["logits"], original["logits"], atol=1e-5, rtol=1e-4, msg=where)
    # The outputs depend on the image: the comparison is not between constant sequences.
    assert len({tuple(case["beams"][0]) for case in reference["cases"]}) > 3


def test_padded_batch_rows_decode_as_they_do_alone(converted, reference):
    """A padded batch: teacher-forced logits equal the original's on every real position, and each row
    generates what the original generates for that row alone. (transformers < 4.50's generate drops the
    encoder mask from cross-attention on remote code, so the original's own padded batch differs from
    its unbatched rows; the native model honours the mask.)"""
    from florence2_outputs import _run

    loaded, _ = converted
    batch = reference["batch"]
    image_tokens = loaded.processor.num_image_tokens
    mask = batch["attention_mask"]
    rows = mask.shape[0]
    inputs = {"input_ids": torch.cat([torch.full((rows, image_tokens), loaded.model.config.image_token_id),
                                      batch["input_ids"]], dim=1),
              "attention_mask": torch.cat([torch.ones(rows, image_tokens, dtype=mask.dtype), mask], dim=1),
              "pixel_values": batch["pixel_values"]}
    decoder = torch.tensor(batch["beams"])
    with torch.inference_mode():
        logits = loaded.model(**inputs, decoder_input_ids=decoder).logits
        mine = _run(loaded.model, inputs)
    torch.testing.assert_close(logits, batch["logits"], atol=1e-5, rtol=1e-4)
    for row, case in enumerate(reference["cases"][:rows]):
        assert mine["greedy"][row][:len(case["greedy"][0])] == case["greedy"][0], case["task"]
        assert mine["beams"][row][:len(case["beams"][0])] == case["beams"][0], case["task"]


def test_converted_processor_gives_the_originals_text_ids(converted, reference):
    loaded, _ = converted
    processor = loaded.processor
    from florence2_outputs import images

    image_id = loaded.model.config.image_token_id
    for case in reference["cases"]:
        ids = processor(text=[case["task"]], images=[images()[case["image"]]], return_tensors="pt")["input_ids"][0]
        assert (ids[:processor.num_image_tokens] == image_id).all()
        assert ids[processor.num_image_tokens:].tolist() == case["input_ids"][0].tolist(), case["task"]


# -- key mapping and errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("source,target", [
    ("vision_tower.convs.2.proj.weight", "model.vision_tower.convs.2.conv.weight"),
    ("vision_tower.blocks.2.1.spatial_block.conv1.fn.dw.bias", "model.vision_tower.blocks.2.1.spatial_block.conv1.bias"),
    ("vision_tower.blocks.0.0.spatial_block.window_attn.norm.weight",
     "model.vision_tower.blocks.0.0.spatial_block.norm1.weight"),
    ("vision_tower.blocks.3.0.channel_block.channel_attn.fn.qkv.weight",
     "model.vision_tower.blocks.3.0.channel_block.channel_attn.qkv.weight"),
    ("vision_tower.blocks.1.0.channel_block.ffn.norm.bias", "model.vision_tower.blocks.1.0.channel_block.norm2.bias"),
    ("vision_tower.blocks.1.0.spatial_block.ffn.fn.net.fc2.weight",
     "model.vision_tower.blocks.1.0.spatial_block.ffn.fc2.weight"),
    ("image_projection", "model.multi_modal_projector.image_projection.weight"),
    ("image_pos_embed.column_embeddings.weight", "model.multi_modal_projector.image_position_embed.column_embeddings.weight"),
    ("language_model.model.decoder.layers.0.encoder_attn.k_proj.weight",
     "model.language_model.decoder.layers.0.encoder_attn.k_proj.weight"),
    ("language_model.lm_head.weight", "lm_head.weight"),
    ("vision_tower.head.weight", None),
    ("language_model.final_logits_bias", None),
])
def test_key_mapping(source, target):
    assert native_key(source) == target


@pytest.fixture(scope="module")
def source_state(remote_code_dir):
    return read_state_dict(remote_code_dir)


@pytest.fixture(scope="module")
def native_config(remote_code_dir):
    from florence2_serve.worker.conversion import convert_config

    return convert_config(json.loads((remote_code_dir / "config.json").read_text()), 5)[0]


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"vision_tower.blocks.0.0.spatial_block.extra.weight": torch.zeros(1)}),
     "no place in native Florence-2: vision_tower.blocks.0.0.spatial_block.extra.weight"),
    (lambda s: s.pop("vision_tower.blocks.2.1.channel_block.ffn.norm.bias"),
     "missing from the checkpoint: model.vision_tower.blocks.2.1.channel_block.norm2.bias"),
    (lambda s: s.update({"image_proj_norm.weight": torch.ones(7)}), r"model.multi_modal_projector.image_proj_norm.weight \(7,\)"),
    (lambda s: s.update({"language_model.final_logits_bias": torch.ones_like(s["language_model.final_logits_bias"])}),
     "final_logits_bias is not zero"),
    (lambda s: s.update({"language_model.model.encoder.layers.0.fc1.lora_A.default.weight": torch.zeros(4, 32)}),
     "unmerged adapter tensors .*merge_and_unload"),
])
def test_bad_checkpoints_are_errors_naming_the_tensors(source_state, native_config, change, message):
    state = dict(source_state)
    change(state)
    with pytest.raises(ConversionError, match=message):
        convert_state_dict(state, native_config)


def test_nothing_is_left_over_or_invented(source_state, native_config):
    converted, unused = convert_state_dict(dict(source_state), native_config)
    assert unused == ["language_model.final_logits_bias", "vision_tower.head.bias", "vision_tower.head.weight",
                      "vision_tower.norms.bias", "vision_tower.norms.weight"]
    assert len(converted) + len(unused) == len(source_state)
    projection = source_state["image_projection"]
    assert torch.equal(converted["model.multi_modal_projector.image_projection.weight"], projection.t())


def test_merged_lora_and_untied_head_and_pytorch_bin_convert(remote_code_dir, source_state, tmp_path):
    """A fine-tune with LoRA merged in (changed weights, same keys), an lm_head of its own, saved as
    pytorch_model.bin: converted tensor for tensor."""
    tuned = tmp_path / "tuned"
    shutil.copytree(remote_code_dir, tuned)
    (tuned / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in source_state.items()}
    generator = torch.Generator().manual_seed(7)
    for key in [k for k in state if k.endswith("q_proj.weight") or k.endswith("qkv.weight")]:
        rows, columns = state[key].shape
        down, up = torch.randn(4, columns, generator=generator), torch.randn(rows, 4, generator=generator)
        state[key] += 0.01 * up @ down  # W + B A: what merge_and_unload leaves behind
    state["language_model.lm_head.weight"] = state["language_model.model.shared.weight"] + 0.5
    torch.save(state, tuned / "pytorch_model.bin")
    report = convert_checkpoint(tuned, tmp_path / "native")
    assert not report.tied_lm_head
    from transformers import Florence2ForConditionalGeneration

    native = Florence2ForConditionalGeneration.from_pretrained(tmp_path / "native").state_dict()
    for key, tensor in state.items():
        target = native_key(key)
        if target is not None:
            expected = tensor.t() if key == "image_projection" else tensor
            assert torch.equal(native[target], expected), key


def test_a_pickle_with_objects_is_refused(remote_code_dir, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(remote_code_dir, hostile)
    (hostile / "model.safetensors").unlink()
    torch.save({"weights": {"a": torch.zeros(1)}, "payload": Path("/etc/passwd")}, hostile / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        convert_checkpoint(hostile, tmp_path / "out")


def test_unsupported_vision_features_are_named(remote_code_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(remote_code_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["vision_config"]["image_feature_source"] = ["last_frame"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="image_feature_source"):
        convert_checkpoint(odd, tmp_path / "out")


def test_formats(remote_code_dir, tiny_model_dir):
    assert checkpoint_format(json.loads((remote_code_dir / "config.json").read_text())) == "microsoft"
    assert checkpoint_format(json.loads((tiny_model_dir / "config.json").read_text())) == "native"
    assert checkpoint_format({"auto_map": {}, "model_type": "something_else"}) == "remote"


# -- the cache, the CLI and doctor -----------------------------------------------------------------------

def test_the_cache_converts_once_per_digest(remote_code_dir, tmp_path):
    first = ensure_converted(remote_code_dir, tmp_path)
    again = ensure_converted(remote_code_dir, tmp_path)
    assert first.converted_now and not again.converted_now and first.path == again.path
    changed = tmp_path / "changed"
    shutil.copytree(remote_code_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    config["text_config"]["num_beams"] = 4
    (changed / "config.json").write_text(json.dumps(config))
    assert checkpoint_digest(changed) != checkpoint_digest(remote_code_dir)
    assert ensure_converted(changed, tmp_path).converted_now
    assert not list(tmp_path.glob(".*.tmp")), "no staging directory is left behind"


def test_a_conversion_made_by_another_converter_version_is_not_served(remote_code_dir, tmp_path):
    """Entries of the converter before Florence-2's tokens were added (no version; another name) and of
    any other version are converted again, never loaded."""
    from florence2_serve.worker.conversion_cache import RECORD, cached_conversion

    first = ensure_converted(remote_code_dir, tmp_path)
    record = json.loads((first.path / RECORD).read_text())
    assert record["version"] == 2 and record["task_tokens_added"] == 1024 and record["image_backend"] == "pil"
    old = tmp_path / first.digest[:32]  # where the first converter kept it
    shutil.copytree(first.path, old)
    record["version"] = 1
    (first.path / RECORD).write_text(json.dumps(record))
    assert cached_conversion(remote_code_dir, tmp_path) is None
    again = ensure_converted(remote_code_dir, tmp_path)
    assert again.converted_now and again.path == first.path
    assert json.loads((again.path / RECORD).read_text())["version"] == 2


def test_two_workers_starting_together_convert_once(remote_code_dir, tmp_path):
    code = ("import sys; from pathlib import Path; from florence2_serve.worker.conversion_cache import "
            "ensure_converted; print(ensure_converted(Path(sys.argv[1]), Path(sys.argv[2])).converted_now)")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(remote_code_dir), str(tmp_path / "cache")],
                                  stdout=subprocess.PIPE, text=True, env=python_env()) for _ in range(2)]
    outputs = sorted(process.communicate(timeout=120)[0].strip().splitlines()[-1] for process in processes)
    assert outputs == ["False", "True"]


def test_convert_command(remote_code_dir, tiny_model_dir, tmp_path):
    from florence2_serve.client.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["convert", str(remote_code_dir), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "273 tensors" in result.output and "vision_tower.head.weight" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "florence2"
    again = runner.invoke(cli, ["convert", str(remote_code_dir), str(tmp_path / "out")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    native = runner.invoke(cli, ["convert", str(tiny_model_dir), str(tmp_path / "other")])
    assert native.exit_code == 1 and "native checkpoint" in native.output and "needs no conversion" in native.output


def test_doctor_says_the_format_and_what_happens_to_it(remote_code_dir, tiny_model_dir, tmp_path):
    options = LoadOptions(convert_cache=str(tmp_path))
    before = inspect_checkpoint(str(remote_code_dir), options)
    assert before["format"] == "microsoft" and "will be converted" in before["plan"]
    ensure_converted(remote_code_dir, tmp_path)
    after = inspect_checkpoint(str(remote_code_dir), options)
    assert "already done" in after["plan"] and str(tmp_path) in after["plan"]
    assert inspect_checkpoint(str(tiny_model_dir))["plan"] == "served natively"
    forced = inspect_checkpoint(str(remote_code_dir), LoadOptions(kind="remote"))
    assert "own code" in forced["plan"] and "transformers < 4.50" in forced["plan"]


def test_a_worker_serves_a_microsoft_checkpoint_and_list_models_says_so(
        remote_code_dir, valkey, front_end_factory, worker_factory, tiny_png, tmp_path):
    """The default install, no legacy environment: the worker converts on load and serves the job."""
    from florence2_serve.client import Florence2Client
    from florence2_serve.v1 import florence2_pb2 as pb

    front = front_end_factory(valkey.connection_url)
    worker = worker_factory(valkey.connection_url, f"ms={remote_code_dir}", "--convert-cache", str(tmp_path / "cache"),
                            worker_id="ms-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=60) as client:
        result = client.detect(tiny_png, "ms", "CAPTION", max_new_tokens=8)
        (model,) = client.list_models()
    assert result.generated_tokens > 0 and result.model_id == str(remote_code_dir)
    assert model.source_format == pb.CHECKPOINT_FORMAT_MICROSOFT and model.kind == pb.MODEL_KIND_FLORENCE2
    (info,) = model.workers
    assert info.converted and info.source_format == pb.CHECKPOINT_FORMAT_MICROSOFT
    log = worker.log_path.read_text()
    assert "converted Microsoft-format checkpoint" in log and "(converted from Microsoft's format)" in log


def test_text_holding_the_image_placeholder_is_refused(converted):
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_outputs import images

    loaded, _ = converted
    settings = GenerationSettings(max_new_tokens=4)
    bad, good = Florence2Engine(loaded).run_batch([
        InferenceRequest(images()[0], Task.CAPTION_TO_PHRASE_GROUNDING, text="a <mask> car", generation=settings),
        InferenceRequest(images()[0], Task.CAPTION_TO_PHRASE_GROUNDING, text="a red car", generation=settings)])
    assert bad.error.reason == "INVALID_FIELD" and "<mask>" in bad.error.message
    assert good.error is None and good.result.generated_tokens > 0
