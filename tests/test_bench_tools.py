"""The benchmarks' own parsing: what bench/bench_gil.py reads from py-spy and the image variants it sends."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_gil import activity, distinct_jpeg, model_thread_samples, thread_samples  # noqa: E402


def test_image_variants_decode_to_the_same_pixels_with_distinct_bytes():
    from PIL import Image

    from florence2_serve.common.images import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buffer, format="JPEG")
    original = buffer.getvalue()
    variants = [distinct_jpeg(original, i) for i in range(3)]
    assert len(set(variants)) == 3
    assert all(decode_image(v).tobytes() == decode_image(original).tobytes() for v in variants)


def test_py_spy_stacks_are_sorted_by_what_the_model_thread_was_doing(tmp_path):
    base = ("thread (7): florence2-model;Thread.run (threading.py:982);ContinuousModelLoop._continuous_loop "
            "(worker/continuous.py:66);DecodeEngine.serve (worker/decoding/engine.py:131)")
    lines = [
        f"{base};Stepping._step (worker/decoding/stepping.py:40);StaticDecoder.forward (x.py:1) 5",
        f"{base};Stepping._step (worker/decoding/stepping.py:80);DecodeEngine._finish (engine.py:290) 2",
        f"{base};DecodeEngine._admit (worker/decoding/engine.py:150) 3",
        f"{base};ContinuousModelLoop._continuous_loop.<locals>.pull (worker/continuous.py:33);"
        "Condition.wait (threading.py:320) 4",
        f"{base};ContinuousModelLoop._continuous_loop.<locals>.pull (worker/continuous.py:50) 1",
        "thread (8): florence2-fetcher;Thread.run (threading.py:982);BatchWorker._fetch_loop (b.py:1) 9",
    ]
    raw = tmp_path / "all.raw"
    raw.write_text("\n".join(lines) + "\n")
    assert model_thread_samples(raw) == {"step": 5, "post-process": 2, "admit": 3, "wait for work": 4, "take": 1}
    assert activity("thread (7): florence2-model;Thread.run (threading.py:982)") == "other"
    assert thread_samples(raw) == {"florence2-model": 15, "florence2-fetcher": 9}
