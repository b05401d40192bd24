"""JPEG DCT-scaled decode (the spec's ``decode="jpeg_dct"``) vs full decode: parity of the model's embedding and the
decode + preprocess time, on the same bytes. Two DCT rules: the default (``dct_oversample=2``: the reduced image
keeps 2x the resize target) and ``dct_oversample=1`` (the smallest scale that just covers it).

* parity: every real sample photo, JPEG-encoded (quality 92) at its own size and upscaled to 4032 x 3024 (a 12 MP
  phone-size JPEG: the photo's centre 4:3 part, bicubic upscale, sensor-like noise sigma 2 so the JPEG holds
  high-frequency content as a camera's does) -> embedding cosine of the edge model (real EfficientNet-Lite0 weights;
  torch FP32, or a bundle's backend with --bundle) between the two decodes, and max |diff| of the input tensors.
* time: decode + preprocess of the 12 MP JPEG, the three ways interleaved run by run with a pause before each (idle
  thread pools spin and slow what runs next), p50 / p95 and the ratio to the full decode.

    .venv/bin/python benchmarks/decode.py [--iters 20] [--pause-ms 100] [--photos N] [--bundle DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import cv2
import numpy as np

from geosurge.images import load_image, read_image
from geosurge.preprocess import preprocess
from geosurge.report import format_table, write_json
from geosurge.runtime.benchmark import encode_jpeg as jpeg
from geosurge.runtime.benchmark import phone_photo as phone_size
from geosurge.samples import sample_photo_paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="timed runs per way (interleaved)")
    ap.add_argument("--pause-ms", type=float, default=100.0, help="pause before each timed call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--photos", type=int, default=None, help="use only the first N sample photos (a short run)")
    ap.add_argument("--bundle", help="embed with this bundle's backend (torch-free) instead of the edge torch model")
    ap.add_argument("--json", default="benchmarks/results/decode.json")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)

    if args.bundle:
        from geosurge.runtime import Localizer

        loc = Localizer(args.bundle, threads=args.threads)
        spec, embed, model_name = loc.spec, loc.embed, f"bundle {args.bundle} ({loc.runner.name.value})"
    else:
        import torch

        from geosurge.export.source import load_model

        torch.set_num_threads(args.threads)
        model, _ = load_model("edge", seed=0)
        spec, model_name = model.config.preprocess, "edge (torch FP32, EfficientNet-Lite0 ImageNet weights)"

        def embed(x):
            with torch.inference_mode():
                return model.embed(torch.from_numpy(x)).numpy()
    ways = {"full": replace(spec, decode="full"), "dct x2 (default)": replace(spec, decode="jpeg_dct", dct_oversample=2.0),
            "dct x1 (just covers)": replace(spec, decode="jpeg_dct", dct_oversample=1.0)}
    full = ways["full"]

    rows = []
    for i, p in enumerate(sample_photo_paths()[:args.photos]):
        base = read_image(p)
        for label, rgb in (("native", base), ("12 MP", phone_size(base, i))):
            data = jpeg(rgb)
            b = load_image(data, full)
            xb = preprocess(b, full)[None]
            eb = embed(xb)[0]
            row = {"photo": p.stem, "size": label, "stored": f"{b.shape[1]}x{b.shape[0]}"}
            for tag, s in (("x2", ways["dct x2 (default)"]), ("x1", ways["dct x1 (just covers)"])):
                xa = preprocess(load_image(data, s), s)[None]
                ea = embed(xa)[0]
                row[f"{tag}_scale"] = f"1/{s.jpeg_reduction(*rgb.shape[:2])}"
                row[f"{tag}_input_max_abs"] = float(np.abs(xa - xb).max())
                row[f"{tag}_cosine"] = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
            rows.append(row)
    print(format_table(rows, title=f"embedding parity, DCT-scaled vs full JPEG decode: {model_name}, spec resize "
                                   f"{spec.resize_size} -> {spec.size}"))
    summary = {}
    for tag in ("x2", "x1"):
        cos = np.asarray([r[f"{tag}_cosine"] for r in rows if r[f"{tag}_scale"] != "1/1"])
        summary[tag] = {"n_scaled": int(cos.size), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        print(f"dct {tag}: cosine over the {cos.size} images decoded at a reduced scale: mean {cos.mean():.6f}, "
              f"min {cos.min():.6f}")

    big = jpeg(phone_size(read_image(sample_photo_paths()[0]), 0))
    t = {k: [] for k in ways}
    for s in ways.values():  # warm-up
        preprocess(load_image(big, s), s)
    for _ in range(args.iters):
        for name, s in ways.items():
            time.sleep(args.pause_ms / 1e3)
            t0 = time.perf_counter()
            x = preprocess(load_image(big, s), s)
            t[name].append((time.perf_counter() - t0) * 1e3)
    p50_full = float(np.median(t["full"]))
    timing = [{"decode": k, "scale": f"1/{ways[k].jpeg_reduction(3024, 4032)}", "p50_ms": float(np.median(v)),
               "p95_ms": float(np.percentile(v, 95)), "mean_ms": float(np.mean(v)),
               "speedup_p50": p50_full / float(np.median(v))} for k, v in t.items()]
    print()
    print(format_table(timing, title=f"decode + preprocess of a 4032x3024 JPEG ({len(big) / 1e6:.1f} MB), "
                                     f"{args.iters} interleaved runs, {args.pause_ms:.0f} ms pause, {args.threads} "
                                     f"OpenCV threads"))
    assert x.shape == (3, spec.size, spec.size)
    write_json(args.json, {"model": model_name, "spec": spec.to_dict(), "parity": rows, "parity_summary": summary,
                           "timing": timing, "iters": args.iters, "pause_ms": args.pause_ms, "threads": args.threads})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
