"""GPU checks: run on a CUDA machine, skipped cleanly (marker `gpu`) everywhere else."""

import pytest

from test_flash_attn_shim import LOAD_REMOTE, make_broken_flash_attn, run_python

pytestmark = pytest.mark.gpu


def test_fp16_default_on_cuda_and_float_inputs_cast(tiny_model_dir):
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.loader import LoadOptions, load_model
    from florence2_serve.worker.model_builder import lesson_images

    for attention in ("eager", "sdpa"):
        loaded = load_model(str(tiny_model_dir), LoadOptions(device="cuda", attention=attention))
        assert loaded.dtype_name == "fp16" and loaded.device.type == "cuda"
        settings = GenerationSettings(max_new_tokens=16)
        outcomes = Florence2Engine(loaded).run_batch(
            [InferenceRequest(image, Task.OD, generation=settings) for image in lesson_images()])
        assert all(o.error is None for o in outcomes), [o.error for o in outcomes]


def test_broken_flash_attn_wheel_on_real_cuda(tmp_path, remote_code_dir):
    """On a CUDA machine transformers takes the flash-attn import path for real (no patching)."""
    site = make_broken_flash_attn(tmp_path)
    code = LOAD_REMOTE.replace("torch.cuda.is_available = lambda: True", "assert torch.cuda.is_available()")
    without = run_python(code.format(use_shim=False, path=str(remote_code_dir)), PYTHONPATH=site)
    assert without.returncode != 0 and "undefined symbol" in without.stderr
    with_shim = run_python(code.format(use_shim=True, path=str(remote_code_dir)), PYTHONPATH=site)
    assert with_shim.returncode == 0, with_shim.stderr[-3000:]


def test_decode_engine_on_cuda_eager_and_compiled_give_generates_tokens(tiny_model_dir):
    """The decode engine on a GPU, eager and with --compile (static shapes, CUDA graphs): the tokens of
    transformers' generate, greedy and beams 3, batch 1 and 8. What `--compile`'s CUDA default waits on."""
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.loader import LoadOptions, load_model
    from florence2_serve.worker.model_builder import lesson_images

    loaded = load_model(str(tiny_model_dir), LoadOptions(device="cuda"))
    plain = Florence2Engine(loaded)
    compiled = DecodeEngine(loaded, DecodeOptions(rows=24, compile=True))
    compiled.warm_up((1, 8))
    engines = [DecodeEngine(loaded, DecodeOptions(rows=24)), compiled]
    for beams in (1, 3):
        settings = GenerationSettings(num_beams=beams, max_new_tokens=40)
        requests = [(image, task) for image in lesson_images() for task in (Task.OD, Task.CAPTION, Task.OCR)][:8]
        for size in (1, 8):
            def batch():
                return [InferenceRequest(image, task, generation=settings) for image, task in requests[:size]]
            expected = [o.result.raw_text for o in plain.run_batch(batch())]
            for engine in engines:
                assert [o.result.raw_text for o in engine.run_batch(batch())] == expected, (beams, size)


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compiled"])
def test_start_up_canary_passes_on_cuda(tiny_model_dir, compile_step):
    """The decode engine gives generate's tokens on CUDA fp16 (what every worker checks at start)."""
    from florence2_serve.worker.canary import check_decode_engine
    from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.loader import LoadOptions, load_model

    loaded = load_model(str(tiny_model_dir), LoadOptions(device="cuda"))
    engine = DecodeEngine(loaded, DecodeOptions(rows=6, compile=compile_step))
    if compile_step:
        engine.warm_up((1, 2))
    report = check_decode_engine(engine, Florence2Engine(loaded))
    assert report.engine == "decode", report.note
