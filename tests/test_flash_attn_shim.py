"""The flash_attn shim: module shape, idempotence, and the broken-wheel case it exists for."""

import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import python_env

BROKEN = 'raise ImportError("/venv/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c105Error4whatEv")\n'


def make_broken_flash_attn(root: Path) -> Path:
    """A flash-attn 2.6.3 distribution whose import dies like an ABI-mismatched wheel."""
    site = root / "broken_site"
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text(BROKEN)
    dist = site / "flash_attn-2.6.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.6.3\n")
    (dist / "top_level.txt").write_text("flash_attn\n")
    (dist / "RECORD").write_text("flash_attn/__init__.py,,\nflash_attn-2.6.3.dist-info/METADATA,,\n")
    return site


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=python_env(**env), timeout=240)


def test_shim_modules_have_real_specs_and_names():
    result = run_python("""
        import importlib.util, sys
        from florence2_serve.worker import flash_attn_shim
        status = flash_attn_shim.install()
        again = flash_attn_shim.install()
        assert status.in_use == "shim" and again.in_use == "shim"
        before = dict(sys.modules)
        for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.flash_attn_interface"):
            module = sys.modules[name]
            assert importlib.util.find_spec(name) is module.__spec__ is not None
            assert module.__file__ and isinstance(module.__path__, list)
            assert module.__version__ == "2.6.3"
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
        from flash_attn.flash_attn_interface import flash_attn_func as f2
        flash_attn_shim.install()
        assert all(sys.modules[n] is before[n] for n in ("flash_attn", "flash_attn.bert_padding"))
        try:
            flash_attn_func(None)
        except RuntimeError as exc:
            assert "eager" in str(exc)
        else:
            raise AssertionError("shim function must refuse to run")
        import torch
        x = torch.arange(12.0).reshape(2, 3, 2)
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        packed, indices, cu, max_len, _ = unpad_input(x, mask)
        assert packed.shape == (3, 2) and cu.tolist() == [0, 2, 3] and max_len == 2
        assert torch.equal(pad_input(packed, indices, 2, 3), x * mask.unsqueeze(-1))
        print("OK")
    """)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_working_flash_attn_wins(tmp_path):
    site = tmp_path / "good"
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text("__version__ = '2.7.0'\ndef flash_attn_func(*a): return 'real'\n")
    result = run_python("""
        from florence2_serve.worker import flash_attn_shim
        status = flash_attn_shim.install()
        import flash_attn
        assert status.in_use == "real" and flash_attn.flash_attn_func() == "real", status
        print("OK")
    """, PYTHONPATH=site)
    assert result.returncode == 0, result.stderr


LOAD_REMOTE = """
    import sys
    import torch
    torch.cuda.is_available = lambda: True  # transformers takes the flash-attn import path only on CUDA
    if {use_shim}:
        from florence2_serve.worker import flash_attn_shim
        print(flash_attn_shim.install())
    from transformers.utils import is_flash_attn_2_available
    assert is_flash_attn_2_available(), "the broken wheel's metadata must make transformers report flash-attn"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True, attn_implementation="eager")
    print("LOADED", type(model).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["default", "legacy"])
def test_broken_flash_attn_wheel_fails_without_shim_and_loads_with_it(tmp_path, remote_code_dir, env_name, request):
    site = make_broken_flash_attn(tmp_path)
    paths = [site]
    if env_name == "legacy":
        paths.append(request.getfixturevalue("legacy_site"))
    pythonpath = ":".join(map(str, paths))
    without = run_python(LOAD_REMOTE.format(use_shim=False, path=str(remote_code_dir)), PYTHONPATH=pythonpath,
                         HF_HUB_OFFLINE=1)
    assert without.returncode != 0
    assert "undefined symbol: _ZN3c105Error" in without.stderr
    with_shim = run_python(LOAD_REMOTE.format(use_shim=True, path=str(remote_code_dir)), PYTHONPATH=pythonpath,
                           HF_HUB_OFFLINE=1)
    assert with_shim.returncode == 0, with_shim.stderr[-3000:]
    assert "LOADED Florence2ForConditionalGeneration" in with_shim.stdout
    assert "installed_package='broken'" in with_shim.stdout
