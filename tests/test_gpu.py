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
