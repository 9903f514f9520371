"""Shared fixtures: tiny models built offline once per test session, real valkey servers."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
    cuda = False
    if HAS_TORCH:
        import torch

        cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny native Florence-2 (random weights, taught a few answers), built once."""
    from florence2_serve.worker.model_builder import build_native

    return build_native(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from florence2_serve.worker.loader import LoadOptions, load_model

    return load_model(str(tiny_model_dir), LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def remote_code_dir(tmp_path_factory) -> Path:
    """The tiny remote-code fixture (auto_map, flash_attn import under is_flash_attn_2_available)."""
    from florence2_serve.worker.fixtures import build_remote_code

    return build_remote_code(tmp_path_factory.mktemp("models") / "remote")


@pytest.fixture(scope="session")
def legacy_site() -> Path:
    """transformers < 4.50 installed with `pip --target` (.ci/run makes it); tests using it run subprocesses."""
    path = Path(os.environ.get("FLORENCE2_LEGACY_SITE", REPO / ".legacy"))
    if not (path / "transformers").is_dir():
        assert not os.environ.get("CI"), f"CI must test the legacy loader: .ci/setup installs {path}"
        pytest.skip(f"legacy transformers not installed at {path}: pip install --target {path} 'transformers>=4.44,<4.50'")
    return path


def python_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
