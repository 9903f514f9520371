"""Time the conversion of a full-size Microsoft-format checkpoint (random weights, built offline).

    python bench/bench_convert.py --size base --workdir /tmp/convert-bench

Builds the Microsoft-format checkpoint once (kept in --workdir for later runs), then times, each in a
fresh directory: the digest of its files, the conversion (config, tensors, processor, safetensors
written), and the load of the native copy, as a worker does them on its first start. Then the cost of
the reference's PIL preprocessing (the default for converted checkpoints) against torchvision's, per
image (examples/car.jpg, 640x480), torch on one thread, the two interleaved.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--workdir", default="/tmp/florence2-convert-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import transformers

    from florence2_serve.worker.conversion import convert_checkpoint
    from florence2_serve.worker.conversion_cache import checkpoint_digest
    from florence2_serve.worker.fixtures import build_remote_code
    from florence2_serve.worker.loader import LoadOptions, load_model

    work = Path(args.workdir)
    source = work / f"microsoft-{args.size}"
    if not (source / "model.safetensors").is_file():
        started = time.perf_counter()
        build_remote_code(source, size=args.size)
        print(f"built {source} in {time.perf_counter() - started:.1f}s")
    size_mb = sum(p.stat().st_size for p in source.iterdir() if p.is_file()) / 1e6
    rows = []
    for repeat in range(args.repeats):
        target = work / f"native-{args.size}-{repeat}"
        shutil.rmtree(target, ignore_errors=True)
        started = time.perf_counter()
        checkpoint_digest(source)
        digest_s = time.perf_counter() - started
        report = convert_checkpoint(source, target)
        started = time.perf_counter()
        loaded = load_model(str(target), LoadOptions(device="cpu"))
        load_s = time.perf_counter() - started
        rows.append({"digest_s": round(digest_s, 2), "convert_s": round(report.seconds, 2),
                     "load_native_s": round(load_s, 2), "tensors": report.tensors,
                     "task_tokens_added": report.task_tokens_added})
        del loaded
        if repeat == args.repeats - 1:
            pixels = preprocess_ms(target)
        shutil.rmtree(target, ignore_errors=True)
    print(json.dumps({
        "size": args.size, "checkpoint_mb": round(size_mb, 1), "rows": rows, "preprocess_ms_per_image": pixels,
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }, indent=2))


def preprocess_ms(checkpoint: Path, repeats: int = 40) -> dict:
    """Median ms per image of each image backend on the converted checkpoint's own processor settings."""
    import statistics

    import torch
    from PIL import Image
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    image = Image.open(Path(__file__).resolve().parent.parent / "examples" / "car.jpg").convert("RGB")
    processors = {backend: AutoProcessor.from_pretrained(checkpoint, backend=backend).image_processor
                  for backend in ("pil", "torchvision")}
    times: dict[str, list[float]] = {backend: [] for backend in processors}
    for _ in range(repeats):
        for backend, processor in processors.items():
            started = time.perf_counter()
            processor([image], return_tensors="pt")
            times[backend].append((time.perf_counter() - started) * 1000)
    return {backend: round(statistics.median(values), 2) for backend, values in times.items()}


if __name__ == "__main__":
    main()
