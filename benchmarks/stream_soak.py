"""Stream soak: N frames from a live, looping network camera with evidence fusion on, through the torch-free runtime;
resident memory and open file descriptors sampled along the way. Fails (exit 1) when RSS grows more than 5% after
warm-up or the descriptor count grows at all.

The camera is an MJPEG-over-HTTP stream (``multipart/x-mixed-replace``, what IP cameras serve) from a server thread
in this process; every ``--drop-every`` frames it closes the connection, so the runtime's reconnect path is soaked
too. The runtime loop runs in a child process that imports only ``geosurge.runtime`` (its RSS is not the parent's).

    .venv/bin/python benchmarks/stream_soak.py --bundle BUNDLE [--frames 10000] [--fuse 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

CHILD = r"""
import json, os, sys
from geosurge.runtime import Localizer
from geosurge.runtime.sources import SourceOptions
from geosurge.runtime.stream import locate_frames

bundle, url, frames, fuse, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def sample(i):
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024
    print(json.dumps({"frame": i, "rss_mb": round(rss, 2), "fds": len(os.listdir("/proc/self/fd"))}), flush=True)

# stable_s=0: every drop of this looping camera is a new outage (the soak reconnects hundreds of times on purpose)
opts = SourceOptions(read_timeout_s=5.0, reconnects=3, backoff_s=0.0, stable_s=0.0)
with Localizer(bundle, threads=2) as loc:
    n = 0
    for rec in locate_frames(loc, url, every=every, max_frames=frames, fuse=fuse, options=opts):
        n += 1
        if n == 1 or n % 500 == 0:
            sample(n)
    if n % 500:
        sample(n)
    if "torch" in sys.modules:
        raise SystemExit("the runtime imported torch")
"""


def jpeg_frames(n: int = 24) -> list[bytes]:
    import cv2
    import numpy as np

    from geosurge.images import load_image
    from geosurge.samples import sample_photo_paths

    out = []
    for i, p in enumerate((sample_photo_paths() * n)[:n]):
        rgb = cv2.resize(load_image(p), (320, 240), interpolation=cv2.INTER_AREA)
        rgb = np.roll(rgb, 7 * i, axis=1)  # no two frames alike
        out.append(cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
    return out


def serve(frames: list[bytes], drop_every: int):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                for i in range(drop_every):
                    jpg = frames[i % len(frames)]
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                     + str(len(jpg)).encode() + b"\r\n\r\n" + jpg + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/stream.mjpg"


def main() -> int:
    from geosurge.report import format_table, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="a bundle directory (e.g. geosurge export --model edge -o DIR)")
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--fuse", type=int, default=5)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--drop-every", type=int, default=600, help="frames per connection before the camera drops it")
    ap.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    ap.add_argument("--json", default="benchmarks/results/stream_soak.json")
    args = ap.parse_args()
    srv, url = serve(jpeg_frames(), args.drop_every)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, args.bundle, url, str(args.frames), str(args.fuse),
                               str(args.every)], capture_output=True, text=True)
    finally:
        srv.shutdown()
    samples = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not samples:
        print(proc.stderr[-2000:], file=sys.stderr)
        print("stream soak: the runtime loop failed", file=sys.stderr)
        return 1
    base = next((s for s in samples if s["frame"] >= 500), samples[0])  # after warm-up (caches, arenas)
    last = samples[-1]
    growth = last["rss_mb"] / base["rss_mb"] - 1.0
    fd_growth = last["fds"] - base["fds"]
    ok = last["frame"] >= args.frames and growth <= args.max_growth and fd_growth <= 0
    print(format_table(samples, ["frame", "rss_mb", "fds"],
                       title=f"stream soak: {last['frame']} located frames, fusion over {args.fuse}, camera drops "
                             f"every {args.drop_every} frames"))
    print(f"RSS {base['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB ({growth:+.1%}, limit +{args.max_growth:.0%}); "
          f"fds {base['fds']} -> {last['fds']} ({fd_growth:+d}) -> {'PASS' if ok else 'FAIL'}")
    write_json(Path(args.json), {"bundle": args.bundle, "frames": last["frame"], "fuse": args.fuse,
                                 "drop_every": args.drop_every, "rss_growth": growth, "fd_growth": fd_growth,
                                 "samples": samples, "passed": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
