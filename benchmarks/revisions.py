"""End-to-end latency of two (or more) geosurge installs, interleaved call by call.

Each install (its own python + a bundle it exported) gets one long-lived worker process that imports *that
install's* ``geosurge.runtime.Localizer``, loads the bundle with the same ``--threads`` and ``--backend`` as every
other worker, and then, on each request, runs ``locate`` once on an image and returns the wall time it measured
around that call (``time.perf_counter``, inside the worker: pipe overhead is not counted). The coordinator sends the
requests in turn (A, B, A, B ...; for two installs which goes first rotates round by round, for more the order is
shuffled per round: ``--order``), so every install sees the same machine state; a worker waits, idle on its pipe,
while another runs. Each image is timed paced (``--pause-ms`` of sleep before every call: a camera at 10 fps with
the default 100 ms, so idle thread pools have stopped spinning) and back-to-back (no pause: a call starts while the
previous install's thread pools may still spin), ``--warmup`` untimed rounds then ``--rounds`` timed.

The first install is the baseline: the table's ratios are baseline / install for p50 and p95 (> 1: faster than
the baseline). Figures are ratios measured in one run; absolute milliseconds depend on the machine and its load.

    .venv/bin/python benchmarks/revisions.py \\
        --install old /work/wt/old608/.venv/bin/python out/bundles/old-edge-fp32 \\
        --install new .venv/bin/python out/bundles/new-edge-fp32 \\
        [--threads 2] [--backend onnxruntime] [--rounds 30] [--warmup 5] [--pause-ms 100] [--modes paced back-to-back]
        [--images 12mp.jpg small.jpg] [--input bytes|path] [--order auto|rotate|random] [--json FILE]

Default images: the 12 MP phone JPEG and the small photo ``geosurge benchmark`` uses (``~/.cache/geosurge/bench``).
The worker side (``--worker``) uses the standard library and the install's ``geosurge.runtime`` only, and passes the
Localizer only the keyword arguments its signature has, so it runs against older runtimes too (``Localizer(bundle,
backend=..., threads=...)`` since the first bundle schema).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

WORKER = "--worker"
MODES = {"paced": None, "back-to-back": 0.0}  # pause per mode (None: --pause-ms)
#: locate()'s timing_ms stages, in pipeline order
STAGES = ("decode", "preprocess", "inference", "cell_search", "prediction")


# ---- pure logic (tested) -----------------------------------------------------------------------------------------
def call_order(names: list[str], rounds: int, how: str = "auto", seed: int = 0) -> list[list[str]]:
    """The order of the calls in each round: every name once per round. ``rotate``: round r starts at
    ``names[r % len(names)]`` (A B, B A, A B ... for two), so each install goes first equally often — with two,
    each also follows the other equally often; with three or more a rotation keeps one cyclic order (A always
    after C), which in back-to-back runs hands the same neighbour's spinning thread pools to the same install.
    ``random``: a shuffle per round from ``seed`` (every neighbour equally likely). ``auto``: rotate for two,
    random for more. Raises ValueError for an unknown ``how`` or duplicate names."""
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate install names: {names}")
    if how == "auto":
        how = "rotate" if len(names) <= 2 else "random"
    if how == "rotate":
        n = len(names)
        return [names[r % n:] + names[:r % n] for r in range(rounds)]
    if how == "random":
        rng = random.Random(seed)
        return [rng.sample(names, len(names)) for _ in range(rounds)]
    raise ValueError(f"unknown order {how!r} (auto, rotate or random)")


def percentile(v: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default method,
    ``np.percentile(v, q)``). Raises ValueError on an empty list."""
    if not v:
        raise ValueError("percentile of no samples")
    s = sorted(v)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: dict[tuple[str, str, str], list[float]], baseline: str) -> list[dict]:
    """``samples[(install, image, mode)]`` -> ms per timed call, to one row per key (in the given order): n, p50,
    p95 and the ratios ``baseline / install`` of p50 and p95 against the baseline install on the same image and
    mode (None where the baseline has no samples there)."""
    stats = {k: (percentile(v, 50), percentile(v, 95)) for k, v in samples.items() if v}
    rows = []
    for (inst, image, mode), v in samples.items():
        if not v:
            continue
        p50, p95 = stats[(inst, image, mode)]
        base = stats.get((baseline, image, mode))
        rows.append({"install": inst, "image": image, "mode": mode, "n": len(v), "p50_ms": p50, "p95_ms": p95,
                     f"{baseline}/x p50": base[0] / p50 if base else None,
                     f"{baseline}/x p95": base[1] / p95 if base else None})
    return rows


# ---- worker (runs under each install's python; standard library + that install's geosurge only) ----------------
def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="revisions.py --worker")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default="onnxruntime", help="'default': let the install choose")
    ap.add_argument("--input", choices=["bytes", "path"], default="bytes")
    ap.add_argument("images", nargs="+")
    args = ap.parse_args(argv)
    # the protocol owns the real stdout; anything the library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")

    try:
        import inspect

        import geosurge
        from geosurge.runtime import Localizer

        params = inspect.signature(Localizer.__init__).parameters
        kw = {}
        if args.threads is not None:
            kw["threads"] = args.threads
        if args.backend != "default":
            kw["backend"] = args.backend
        unknown = [k for k in kw if k not in params]
        if unknown:
            raise TypeError(f"this install's Localizer takes no {', '.join(unknown)}")
        loc = Localizer(args.bundle, **kw)
        inputs = [Path(p).read_bytes() if args.input == "bytes" else p for p in args.images]
        for x in inputs:  # first calls (session warm-up, lazy allocations) happen before any timing
            loc.locate(x)
        runner = getattr(loc, "runner", None) or getattr(loc, "backend", None)
        backend = getattr(getattr(runner, "name", None), "value", None) or type(runner).__name__
        info = {"ready": True, "pid": os.getpid(), "python": sys.executable,
                "python_version": platform.python_version(),
                "geosurge": getattr(geosurge, "__version__", None), "geosurge_file": geosurge.__file__,
                "backend": backend, "localizer_kwargs": kw, "versions": {}}
        for mod in ("numpy", "onnxruntime", "cv2", "openvino"):
            if mod in sys.modules:
                info["versions"][mod] = getattr(sys.modules[mod], "__version__", None)
        if "cv2" in sys.modules:
            info["cv2_threads"] = sys.modules["cv2"].getNumThreads()
        try:
            from threadpoolctl import threadpool_info

            info["threadpools"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "filepath")}
                                   for p in threadpool_info()]
        except ImportError:
            pass
        send(info)
    except Exception as e:  # noqa: BLE001 - reported to the coordinator as one line
        send({"error": f"{type(e).__name__}: {e}"})
        return 1

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        try:
            x = inputs[int(cmd)]
            t0 = time.perf_counter()
            r = loc.locate(x)
            ms = (time.perf_counter() - t0) * 1e3
            send({"ms": ms, "stages": r.get("timing_ms", {})})
        except Exception as e:  # noqa: BLE001
            send({"error": f"{type(e).__name__}: {e}"})
    return 0


# ---- coordinator ------------------------------------------------------------------------------------------------
class Worker:
    """One install's worker process and its line protocol."""

    def __init__(self, name: str, python: str, bundle: str, images: list[Path], threads, backend: str,
                 input_kind: str):
        # abspath, not resolve(): a venv's python is a symlink whose own path selects the venv
        self.name, self.python, self.bundle = name, os.path.abspath(python), str(Path(bundle).resolve())
        if not os.access(self.python, os.X_OK):
            raise SystemExit(f"revisions: {python}: not an executable python (install {name})")
        cmd = [self.python, str(Path(__file__).resolve()), WORKER, "--bundle", self.bundle, "--backend", backend,
               "--input", input_kind]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        cmd += [str(p) for p in images]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"revisions: worker {self.name} ({self.python}) exited (code {self.proc.wait()}); "
                             "its stderr is above")
        msg = json.loads(line)
        if "error" in msg:
            raise SystemExit(f"revisions: worker {self.name} ({self.python}, {self.bundle}): {msg['error']}")
        return msg

    def locate(self, index: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        self.proc.stdin.write(f"{index}\n")
        msg = self._read()
        return msg, (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def git_revision(path: Path) -> dict:
    """The git commit (and whether tracked files differ from it) of the checkout holding ``path``."""
    def git(*a):
        r = subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"root": git("rev-parse", "--show-toplevel"), "commit": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%cs %s"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "host": platform.node(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def default_images() -> dict[str, Path]:
    """The 12 MP JPEG and the small photo of ``geosurge benchmark`` (cached; synthesised when missing)."""
    from geosurge.runtime.benchmark import bench_images

    return bench_images(folder_size=1).timed()


def image_info(p: Path) -> dict:
    import hashlib

    from geosurge.image_headers import header_size, sniff_kind

    data = p.read_bytes()
    hw = header_size(sniff_kind(data[:64]), data)
    return {"path": str(p), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16],
            "size": [hw[1], hw[0]] if hw else None}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == WORKER:
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", nargs=3, action="append", required=True, metavar=("NAME", "PYTHON", "BUNDLE"),
                    help="an install: a name, its python (a venv's bin/python) and a bundle it can read "
                         "(repeatable; the first is the baseline)")
    ap.add_argument("--images", nargs="+", metavar="JPEG", help="images (default: geosurge benchmark's 12 MP "
                    "JPEG and small photo)")
    ap.add_argument("--threads", type=int, default=2, help="Localizer threads, the same for every install "
                    "(default 2)")
    ap.add_argument("--backend", default="onnxruntime", help="runtime backend for every install (default "
                    "onnxruntime; 'default': each install's own choice)")
    ap.add_argument("--input", choices=["bytes", "path"], default="bytes", help="locate() gets the encoded bytes "
                    "(default; read once) or the file path")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per image and mode (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    ap.add_argument("--pause-ms", type=float, default=100.0, help="sleep before each paced call (default 100)")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--order", choices=["auto", "rotate", "random"], default="auto",
                    help="the order within a round: rotate (who goes first rotates), random (a seeded shuffle per "
                         "round); default auto: rotate for two installs, random for more")
    ap.add_argument("--seed", type=int, default=0, help="--order random's seed")
    ap.add_argument("--json", default="benchmarks/results/revisions.json")
    args = ap.parse_args(argv)

    from geosurge.report import format_table, write_json

    names = [i[0] for i in args.install]
    if len(set(names)) != len(names):
        ap.error(f"install names must differ: {names}")
    if args.images:
        images = {Path(p).stem: Path(p) for p in args.images}
    else:
        images = default_images()
    for p in images.values():
        if not p.is_file():
            ap.error(f"{p}: no such image")
    machine = machine_info()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"revisions: load average {machine['loadavg_start']}; {len(names)} installs, {len(images)} images, "
        f"modes {args.modes}, {args.warmup} + {args.rounds} rounds, --threads {args.threads}")

    workers: dict[str, Worker] = {}
    try:
        for name, python, bundle in args.install:
            t0 = time.perf_counter()
            workers[name] = Worker(name, python, bundle, list(images.values()), args.threads, args.backend,
                                   args.input)
            w = workers[name]
            w.info["revision"] = git_revision(Path(w.info["geosurge_file"]).parent)
            log(f"  {name}: {w.info['revision']['commit'][:9] if w.info['revision']['commit'] else '?'} "
                f"({w.info['revision']['subject']}), {w.info['backend']}, ready in {time.perf_counter() - t0:.1f} s")
        samples: dict[tuple[str, str, str], list[float]] = {}
        stages: dict[tuple[str, str, str], list[dict]] = {}
        roundtrip: dict[tuple[str, str, str], list[float]] = {}
        calls = []
        for idx, image in enumerate(images):
            for mode in args.modes:
                pause = args.pause_ms if MODES[mode] is None else MODES[mode]
                order = call_order(names, args.warmup + args.rounds, args.order, args.seed + len(calls))
                t0 = time.perf_counter()
                for r, rnd in enumerate(order):
                    for name in rnd:
                        if pause > 0:
                            time.sleep(pause / 1e3)
                        msg, rt = workers[name].locate(idx)
                        timed = r >= args.warmup
                        calls.append({"image": image, "mode": mode, "round": r, "install": name, "timed": timed,
                                      "ms": round(msg["ms"], 4)})
                        if timed:
                            key = (name, image, mode)
                            samples.setdefault(key, []).append(msg["ms"])
                            stages.setdefault(key, []).append(msg["stages"])
                            roundtrip.setdefault(key, []).append(rt)
                log(f"  {image} {mode}: {len(order)} rounds in {time.perf_counter() - t0:.1f} s")
    finally:
        for w in workers.values():
            w.close()
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    # rows grouped by image and mode, installs in the given order
    ordered = {(n, im, m): samples[(n, im, m)] for im in images for m in args.modes for n in names}
    rows = summarize(ordered, names[0])
    stage_rows = []
    for key in ordered:
        st = stages[key]
        row = dict(zip(("install", "image", "mode"), key))
        for s in [s for s in STAGES if any(s in d for d in st)] + sorted({k for d in st for k in d} - set(STAGES)):
            row[f"{s} p50"] = percentile([float(d[s]) for d in st if s in d], 50)
        row["pipe p50"] = percentile([a - b for a, b in zip(roundtrip[key], samples[key])], 50)
        stage_rows.append(row)
    ratio_cols = {c: 2 for c in rows[0] if "/x" in c}
    print(format_table(rows, title=f"end to end, ms (locate() wall time in the worker; ratio: {names[0]} / "
                                   f"install, > 1 is faster)", decimals={"p50_ms": 1, "p95_ms": 1, **ratio_cols}))
    print()
    print(format_table(stage_rows, title="stages, p50 ms (each install's own timing_ms; pipe: the coordinator's "
                                         "round trip minus the worker's time)",
                       decimals={c: 1 for c in stage_rows[0] if c.endswith("p50")}))
    print(f"\nload average start {machine['loadavg_start']}, end {machine['loadavg_end']}")
    report = {
        "what": "end-to-end locate() latency of geosurge installs, interleaved call by call, one worker process "
                "per install",
        "machine": machine,
        "settings": {k: getattr(args, k) for k in ("threads", "backend", "input", "rounds", "warmup", "pause_ms",
                                                   "modes", "order", "seed")},
        "images": {k: image_info(p) for k, p in images.items()},
        "installs": [{"name": n, "python": workers[n].python, "bundle": workers[n].bundle, **workers[n].info}
                     for n in names],
        "summary": rows,
        "stages_p50": stage_rows,
        "calls": calls,
    }
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
