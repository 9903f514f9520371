"""In-process inference benchmark: latency and throughput of the batched engine.

  python bench/bench_core.py --sizes tiny,base --batches 1,4,8 --attention eager,sdpa --new-tokens 32

Models are built offline with random weights (full-size shapes for base/large) under bench/out/models.
Output length is fixed (min_new_tokens = max_new_tokens) so runs are comparable. Prints a Markdown
table and writes JSON next to it. On CUDA it also reports load time and peak VRAM.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def build_if_missing(size: str) -> Path:
    from florence2_serve.worker.model_builder import build_native

    path = OUT / "models" / size
    if not (path / "config.json").exists():
        started = time.perf_counter()
        build_native(path, size=size)
        print(f"built {size} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return path


def bench(size: str, attention: str, batches: list[int], new_tokens: int, beams: int, repeats: int,
          device: str, dtype: str) -> list[dict]:
    import torch

    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.loader import LoadOptions, load_model
    from florence2_serve.worker.model_builder import lesson_images

    path = build_if_missing(size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(str(path), LoadOptions(device=device, dtype=dtype, attention=attention))
    engine = Florence2Engine(loaded)
    settings = GenerationSettings(num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    car = lesson_images()[0]
    rows = []
    for batch in batches:
        requests = [InferenceRequest(car, Task.OD, generation=settings) for _ in range(batch)]
        engine.run_batch(requests)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            outcomes = engine.run_batch(requests)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            assert all(o.result is not None for o in outcomes), [o.error for o in outcomes]
        median = statistics.median(times)
        rows.append({
            "size": size, "attention": attention, "device": str(loaded.device), "dtype": loaded.dtype_name,
            "batch": batch, "new_tokens": new_tokens, "beams": beams, "repeats": repeats,
            "batch_ms": round(median * 1000, 1), "ms_per_image": round(median * 1000 / batch, 1),
            "images_per_s": round(batch / median, 2), "load_s": round(loaded.load_seconds, 2),
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    del engine, loaded
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| model | attention | device | dtype | batch | ms / batch | ms / image | images/s | load s | peak VRAM GB | max RSS GB |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['size']} | {r['attention']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['batch_ms']} | "
                     f"{r['ms_per_image']} | {r['images_per_s']} | {r['load_s']} | {r['peak_vram_gb'] or '-'} | {r['max_rss_gb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--attention", default="eager,sdpa")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=OUT / "core.json")
    args = parser.parse_args()
    import torch
    import transformers

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size in args.sizes.split(","):
        for attention in args.attention.split(","):
            rows += bench(size, attention, [int(b) for b in args.batches.split(",")], args.new_tokens, args.beams,
                          args.repeats, args.device, args.dtype)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(markdown(rows))


if __name__ == "__main__":
    main()
