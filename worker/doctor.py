"""`florence2 doctor`: what this environment can run, and optionally a load + one generate."""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version

from . import flash_attn_shim
from .doctor_service import check_extras, check_redis, check_server


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def collect(model: str | None = None, device: str = "auto", attention: str = "eager", redis_url: str | None = None,
            server: str | None = None) -> dict:
    """A report dict; `report["ok"]` is False when something needed is broken."""
    problems: list[str] = []
    shim = flash_attn_shim.install()  # before transformers is imported
    report: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "florence2_serve": _version("florence2-serve"),
        "torch": None, "transformers": None, "cuda": {"available": False, "devices": []},
        "flash_attn": {
            # real: a working flash-attn; shim: a broken one replaced by the shim; absent: none installed
            # (the shim stands in all the same, so remote-code imports of flash_attn succeed).
            "status": "real" if shim.in_use == "real" else ("shim" if shim.installed_package == "broken" else "absent"),
            "in_use": shim.in_use, "installed_package": shim.installed_package, "detail": shim.detail,
        },
        "can_run": {},
        "problems": problems,
    }
    try:
        import torch

        report["torch"] = torch.__version__
        if torch.cuda.is_available():
            report["cuda"] = {
                "available": True, "version": torch.version.cuda,
                "devices": [
                    {"index": i, "name": torch.cuda.get_device_name(i),
                     "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                    for i in range(torch.cuda.device_count())
                ],
            }
    except Exception as exc:  # noqa: BLE001
        problems.append(f"torch does not import: {exc}")
    try:
        import transformers

        report["transformers"] = transformers.__version__
        from .loader import can_run

        for kind in ("native", "remote"):
            ok, advice = can_run(kind)
            report["can_run"][kind] = {"ok": ok, "advice": advice}
        if not any(entry["ok"] for entry in report["can_run"].values()):
            problems.append("this transformers can run neither native nor remote-code Florence-2")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"transformers does not import: {exc}")
    report["extras"] = check_extras()
    if redis_url:
        report["redis"] = check_redis(redis_url, problems)
    if server:
        report["server"] = check_server(server, problems)
    if model:
        report["model"] = _try_model(model, device, attention, problems)
    report["ok"] = not problems
    return report


def _try_model(model: str, device: str, attention: str, problems: list[str]) -> dict:
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task

    from .backends import create_engine
    from .inference import InferenceRequest
    from .loader import LoadOptions, ModelLoadError, inspect_checkpoint, load_model
    from .model_builder import lesson_images

    entry: dict = {"path": model}
    options = LoadOptions(device=device, attention=attention)
    try:
        entry.update(inspect_checkpoint(model, options))
        loaded = load_model(model, options)
    except (ModelLoadError, ValueError) as exc:
        problems.append(str(exc))
        entry["error"] = str(exc)
        return entry
    entry.update({
        "kind": loaded.kind, "device": str(loaded.device), "dtype": loaded.dtype_name,
        "attention": loaded.attention, "random_weights": loaded.random_weights,
        "load_seconds": round(loaded.load_seconds, 3), "converted": loaded.converted,
    })
    task = Task.DETECT if loaded.kind == "yolo" else Task.OD
    request = InferenceRequest(lesson_images()[0], task, generation=GenerationSettings(max_new_tokens=64))
    engine = create_engine(loaded)
    from .decoding.engine import DecodeEngine

    if isinstance(engine, DecodeEngine):
        from .canary import check_decode_engine
        from .engine import Florence2Engine

        reference = Florence2Engine(loaded)
        canary = check_decode_engine(engine, reference)
        entry.update({"engine": canary.engine, "engine_note": canary.note, "canary_seconds": round(canary.seconds, 3)})
        if canary.engine != "decode":
            engine = reference
    else:
        entry["engine"] = "generate" if engine.kind == "florence2" else engine.kind
    started = time.perf_counter()
    outcome = engine.run_batch([request])[0]
    entry["generate_ms"] = round((time.perf_counter() - started) * 1000, 1)
    if outcome.error:
        problems.append(f"generate failed: {outcome.error.message}")
        entry["error"] = outcome.error.message
    else:
        entry["raw_text"] = outcome.result.raw_text[:200]
        entry["boxes"] = len(outcome.result.boxes)
    return entry


def render(report: dict) -> str:
    lines = [
        f"python        {report['python']}",
        f"torch         {report['torch'] or 'MISSING'}",
        f"transformers  {report['transformers'] or 'MISSING'}",
    ]
    cuda = report["cuda"]
    if cuda["available"]:
        for device in cuda["devices"]:
            lines.append(f"cuda:{device['index']}        {device['name']} ({device['memory_gb']} GB)")
    else:
        lines.append("cuda          not available (CPU only)")
    fa = report["flash_attn"]
    lines.append(f"flash_attn    {fa['status']} (in use: {fa['in_use']}; {fa['detail'] or 'no detail'})")
    for kind, entry in report["can_run"].items():
        state = "yes" if entry["ok"] else f"no - {entry['advice']}"
        lines.append(f"{kind + ' models':<14}{state}")
    if "model" in report:
        model = report["model"]
        if "format" in model:
            lines.append(f"model format  {model['format']}: {model['plan']}")
        if "error" in model and "kind" not in model:
            lines.append(f"model         {model['path']}: FAILED {model['error']}")
        else:
            lines.append(
                f"model         {model['path']}: {model['kind']} on {model['device']} {model['dtype']} "
                f"{model['attention']}, {model.get('engine', '?')} engine, load {model['load_seconds']}s, "
                f"generate {model.get('generate_ms')} ms"
                + (" [converted from Microsoft's format]" if model.get("converted") else "")
                + (" [RANDOM WEIGHTS]" if model.get("random_weights") else "")
            )
    extras = report.get("extras", {})
    lines.append("extras        " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in extras.items()))
    if "redis" in report:
        redis = report["redis"]
        lines.append(f"redis         {redis['url']}: " + (f"UNREACHABLE {redis['error']}" if "error" in redis else
                     f"{redis['server']} {redis['version']}, "
                     f"{'persistent' if redis['persistent'] else 'NOT persistent (jobs lost on restart)'}"))
    if "server" in report:
        server = report["server"]
        lines.append(f"server        {server['address']}: " + (f"FAILED {server['error']}" if "error" in server else
                     f"{server['health']}, models: " + (", ".join(
                         f"{name} ({m['kind']}, {m['live_workers']} live"
                         + (f", engine {'/'.join(m['engines'])}" if m.get("engines") else "") + ")"
                         for name, m in server["models"].items()) or "none")))
        for name, m in server.get("models", {}).items():
            for note in m.get("engine_notes", []):
                lines.append(f"NOTE          {name}: {note}")
    if report.get("model", {}).get("engine_note"):
        lines.append(f"NOTE          {report['model']['engine_note']}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM       {problem}")
    lines.append("OK" if report["ok"] else "BROKEN")
    return "\n".join(lines)
