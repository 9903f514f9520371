"""Offline model building and loading: markers, options, and clear errors."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import python_env
from florence2_serve.worker.loader import LoadOptions, ModelLoadError, can_run, detect_kind, load_model


def test_tiny_checkpoint_reloads_offline_with_random_marker(tiny_model_dir, tiny_loaded):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    assert Florence2ForConditionalGeneration.from_pretrained(tiny_model_dir) is not None
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    vocab = tokenizer.get_vocab()
    assert all(f"<loc_{i}>" in vocab for i in (0, 500, 999)) and "<poly>" in vocab and "<sep>" in vocab
    assert tiny_loaded.random_weights and tiny_loaded.kind == "native"
    assert tiny_loaded.dtype_name == "fp32" and str(tiny_loaded.device) == "cpu"
    assert json.loads((tiny_model_dir / "florence2_serve.json").read_text())["random_weights"] is True


def test_both_loaders_import_in_this_environment(remote_code_dir):
    """Native class and the remote-code path (timm, einops, dynamic module) both import here."""
    import einops  # noqa: F401
    import timm  # noqa: F401
    from transformers import Florence2ForConditionalGeneration  # noqa: F401
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from florence2_serve.worker import flash_attn_shim

    flash_attn_shim.install()
    cls = get_class_from_dynamic_module(
        "modeling_florence2.Florence2ForConditionalGeneration", str(remote_code_dir)
    )
    assert cls.__name__ == "Florence2ForConditionalGeneration"


def test_kind_detection(tiny_model_dir, remote_code_dir):
    assert detect_kind(json.loads((tiny_model_dir / "config.json").read_text())) == "native"
    assert detect_kind(json.loads((remote_code_dir / "config.json").read_text())) == "remote"
    with pytest.raises(ModelLoadError, match="not a Florence-2"):
        detect_kind({"model_type": "bert"})


def test_forcing_remote_code_on_new_transformers_names_the_legacy_extra(remote_code_dir, tmp_path):
    assert can_run("native")[0]
    with pytest.raises(ModelLoadError, match=r"florence2-serve\[legacy\]"):
        load_model(str(remote_code_dir), LoadOptions(kind="remote", convert_cache=str(tmp_path)))
    assert not list(tmp_path.iterdir()), "--kind remote must not convert"


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")


def test_corrupt_weights_are_an_error_not_random_init(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_model(str(broken), LoadOptions(device="cpu"))


def test_missing_weights_are_an_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="noweights"):
        load_model(str(broken), LoadOptions(device="cpu"))


def test_options_validated():
    with pytest.raises(ValueError, match="attention"):
        LoadOptions(attention="flash_attention_2")
    with pytest.raises(ValueError, match="dtype"):
        LoadOptions(dtype="int8")


def test_sdpa_and_bf16_override(tiny_model_dir):
    from florence2_serve.common.tasks import Task
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.model_builder import lesson_images

    loaded = load_model(str(tiny_model_dir), LoadOptions(device="cpu", attention="sdpa", dtype="bf16"))
    assert loaded.attention == "sdpa" and loaded.dtype_name == "bf16"
    assert loaded.model.config._attn_implementation == "sdpa"
    # fp32 pixel values are cast to bf16: no dtype mismatch error.
    outcome = Florence2Engine(loaded).run_batch(
        [InferenceRequest(lesson_images()[0], Task.OD, generation=GenerationSettings(max_new_tokens=8))]
    )[0]
    assert outcome.error is None


def test_cuda_requested_without_cuda_is_an_error(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(str(tiny_model_dir), LoadOptions(device="cuda:0"))


@pytest.mark.slow
def test_legacy_environment_loads_remote_code_and_generates(legacy_site, tmp_path, tiny_model_dir):
    """transformers < 4.50: a Microsoft-format checkpoint runs by its own code (native cannot run there)."""
    code = textwrap.dedent(f"""
        import transformers
        assert transformers.__version__.startswith("4."), transformers.__version__
        from florence2_serve.worker.fixtures import build_remote_code
        from florence2_serve.worker.loader import load_model, ModelLoadError, LoadOptions
        from florence2_serve.common.generation import GenerationSettings
        from florence2_serve.worker.engine import Florence2Engine
        from florence2_serve.worker.inference import InferenceRequest
        from florence2_serve.worker.model_builder import lesson_images
        from florence2_serve.common.tasks import Task
        path = build_remote_code({str(tmp_path / 'remote')!r})
        loaded = load_model(str(path), LoadOptions(attention="sdpa"))
        assert loaded.kind == "remote" and loaded.random_weights and not loaded.converted
        assert loaded.source_format == "microsoft"
        settings = GenerationSettings(max_new_tokens=12)
        car, street, _ = lesson_images()
        outcomes = Florence2Engine(loaded).run_batch([
            InferenceRequest(car, Task.OD, generation=settings),
            InferenceRequest(street, Task.CAPTION, generation=settings)])
        assert all(o.error is None and o.result.raw_text.startswith("</s><s>") for o in outcomes), outcomes
        try:
            load_model({str(tiny_model_dir)!r})
        except ModelLoadError as exc:
            assert "florence2-serve[worker]" in str(exc), exc
        else:
            raise AssertionError("a native checkpoint must not load on transformers < 4.56")
        print("LEGACY OK", transformers.__version__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=python_env(PYTHONPATH=legacy_site, HF_HUB_OFFLINE=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEGACY OK 4.4" in result.stdout


def test_remote_code_load_that_leaves_weights_random_is_an_error(legacy_site, remote_code_dir, tmp_path):
    """--kind remote: tensors missing from the checkpoint (left at their random initial values by the
    model's code) are an error naming them, never a warning; the tied lm_head the fixture's safetensors
    leave out is not one of them."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(remote_code_dir, broken)
    state = load_file(broken / "model.safetensors")
    assert "language_model.lm_head.weight" not in state  # tied: saved once, as the shared embedding
    for key in ("image_proj_norm.weight", "language_model.model.decoder.layers.0.fc1.bias"):
        del state[key]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code = textwrap.dedent(f"""
        from florence2_serve.worker.loader import LoadOptions, ModelLoadError, load_model
        load_model({str(remote_code_dir)!r}, LoadOptions(kind="remote"))
        try:
            load_model({str(broken)!r}, LoadOptions(kind="remote"))
        except ModelLoadError as exc:
            print("REFUSED", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=python_env(PYTHONPATH=legacy_site, HF_HUB_OFFLINE=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "2 tensors are not in the checkpoint" in result.stdout, result.stdout
    assert "image_proj_norm.weight" in result.stdout and "decoder.layers.0.fc1.bias" in result.stdout


@pytest.mark.parametrize("size,millions", [("base", 231.5), ("large", 770.3)])
def test_full_size_configs_match_florence2_parameter_counts(size, millions):
    """Florence-2-base has 0.23B parameters and -large 0.77B; built on the meta device (no memory)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence2_serve.worker.model_builder import SIZES, build_config, build_tokenizer

    spec = SIZES[size]
    tokenizer = build_tokenizer(spec.vocab_size)
    assert len(tokenizer) == 51289
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(build_config(spec, tokenizer))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
