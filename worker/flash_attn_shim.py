"""A stand-in for the `flash_attn` package, installed before transformers is imported.

Florence-2's remote modeling code does `from flash_attn import ...` whenever transformers reports
flash-attn available. A flash-attn wheel built for another PyTorch is still "available" by its
metadata but dies on import ("undefined symbol: _ZN3c105Error..."), which kills the model load.
The shim takes the package's place in `sys.modules` so those imports succeed; the loader always
asks for eager or SDPA attention, so no flash-attn function is ever called. A real, working
flash-attn is left alone.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass

SHIM_VERSION = "2.6.3"
SHIM_MARKER = "__florence2_serve_shim__"
MODULE_NAMES = ("flash_attn", "flash_attn.bert_padding", "flash_attn.flash_attn_interface")

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FlashAttnStatus:
    in_use: str  # "real" or "shim"
    installed_package: str  # "working", "broken" or "absent"
    detail: str = ""

def _not_available(*_args, **_kwargs):
    raise RuntimeError(
        "flash-attn is not available in this process (florence2-serve installed a shim); "
        "load the model with attn_implementation='eager' or 'sdpa'"
    )

def index_first_axis(tensor, indices):
    """Rows of `tensor` (flattened over its first axis) at `indices`."""
    return tensor.reshape(-1, *tensor.shape[1:])[indices]

def unpad_input(hidden_states, attention_mask, *_unused):
    """(batch, seqlen, ...) + mask -> packed tokens, indices, cu_seqlens, max_seqlen (as flash-attn)."""
    import torch

    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, max_seqlen, seqlens

def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of unpad_input: packed tokens -> (batch, seqlen, ...)."""
    import torch

    output = torch.zeros(
        batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype, device=hidden_states.device
    )
    output[indices] = hidden_states
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])

def _make_module(name: str, attrs: dict) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, loader=None, origin=__file__, is_package=True)
    spec.has_location = True
    module = importlib.util.module_from_spec(spec)
    module.__file__ = __file__
    module.__path__ = []
    module.__version__ = SHIM_VERSION
    setattr(module, SHIM_MARKER, True)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module

def is_shim(module: object) -> bool:
    return bool(getattr(module, SHIM_MARKER, False))

def _probe_installed_package() -> tuple[str, str]:
    """Is a real flash_attn importable? ('working'|'broken'|'absent', detail)."""
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError) as exc:
        return "broken", str(exc)
    if spec is None:
        return "absent", ""
    try:
        module = importlib.import_module("flash_attn")
        getattr(module, "flash_attn_func")
        return "working", getattr(module, "__version__", "")
    except Exception as exc:  # noqa: BLE001 - ABI errors surface as ImportError or OSError
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]
        return "broken", f"{type(exc).__name__}: {exc}"

_status: FlashAttnStatus | None = None

def install() -> FlashAttnStatus:
    """Install the shim unless a working flash-attn is importable. Idempotent."""
    global _status
    current = sys.modules.get("flash_attn")
    if current is not None and is_shim(current):
        return _status or FlashAttnStatus("shim", "unknown")
    package_state, detail = _probe_installed_package()
    if package_state == "working":
        _status = FlashAttnStatus("real", "working", detail)
        log.info("flash_attn: using the installed flash-attn %s", detail)
        return _status
    functions = {"flash_attn_func": _not_available, "flash_attn_varlen_func": _not_available}
    padding = {"pad_input": pad_input, "unpad_input": unpad_input, "index_first_axis": index_first_axis}
    root = _make_module("flash_attn", functions)
    bert_padding = _make_module("flash_attn.bert_padding", padding)
    interface = _make_module("flash_attn.flash_attn_interface", functions)
    root.bert_padding = bert_padding
    root.flash_attn_interface = interface
    sys.modules["flash_attn"] = root
    sys.modules["flash_attn.bert_padding"] = bert_padding
    sys.modules["flash_attn.flash_attn_interface"] = interface
    _status = FlashAttnStatus("shim", package_state, detail)
    if package_state == "broken":
        log.warning("flash_attn: installed package does not load (%s); using the shim", detail)
    else:
        log.info("flash_attn: not installed; using the shim")
    return _status

def status() -> FlashAttnStatus | None:
    return _status
