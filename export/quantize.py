"""ONNX Runtime precisions for a bundle's model (the CPU path): fp16, int8 static QDQ, int8 dynamic, and the
measured precision search.

What stays in float by default: only Conv / MatMul / Gemm are ever quantized, so LayerNormalization, Softmax, the
residual Adds and GELU (Erf) keep float; nodes of the cell head (``/head/...``, present with ``--with-logits``) are
always excluded. ``search_precision`` then excludes the nodes with the worst measured quantization error, one
group at a time, until the parity gates pass on held-out images.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError

#: ``--precision`` choices (fp8 is TensorRT-only: ``--target tensorrt``)
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic", "fp8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: the compute ops quantized (ranked, and excluded, by the precision search) ...
COMPUTE_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: ... and the clamps that follow them (folded into the producer's output range; they follow its choice). Everything
#: else (LayerNorm, Softmax, Add, Erf/GELU, ...) stays float.
FOLLOWER_OP_TYPES = ("Clip", "Relu")
STATIC_OP_TYPES = COMPUTE_OP_TYPES + FOLLOWER_OP_TYPES
#: MatMul/Gemm outputs are left unquantized: in the transformer parts they feed Softmax, GELU, residual Adds and
#: LayerNorm, which must see float (onnxruntime then runs DQ->MatMul as MatMulIntegerToFloat). Conv outputs stay
#: quantized so conv chains run as QLinearConv.
FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm")
#: ops that must read exact float inputs even when their producer's output is quantized (a Conv feeding the
#: segmentation softmax): their inputs are rewired around the Q/DQ pair after quantization
FLOAT_INPUT_OP_TYPES = ("LayerNormalization", "Softmax", "Erf", "Gelu", "ReduceL2")
#: a node kept out of INT8 compute keeps INT8 weights (weight-only) only if that alone costs at most this much
#: embedding cosine (measured per node by the search); else its weights stay float
WEIGHT_ONLY_MAX_ERROR = 1e-4
#: dynamic: MatMul and Gemm (onnxruntime's dynamic quantizer rewrites a Gemm into ``<name>_MatMul`` + Add first,
#: so exclusions name both). It runs on the unfused export. Dynamic Conv (ConvInteger) is slow on CPU.
DYNAMIC_OP_TYPES = ("MatMul", "Gemm")
#: ONNX node-name prefixes that are never quantized (the cell head: scoring against the table is retrieval)
ALWAYS_FLOAT_PREFIXES = ("/head/",)
QUANT_TYPES = ("uint8", "int8")


@dataclass
class QuantConfig:
    precision: str = "int8"
    calibrate_method: str = "minmax"
    per_channel: bool = True
    #: U8 activations / S8 weights: the fast pairing on x86 VNNI CPUs (S8 activations ran slower, TOOLCHAIN.md)
    activation_type: str = "uint8"
    weight_type: str = "int8"
    nodes_to_exclude: list[str] = field(default_factory=list)
    search: str | None = None  # None or "auto"
    #: weights of the nodes kept out of INT8 compute: "int8" = weight-only INT8 (per-channel, dequantized to float
    #: for the compute: a quarter of the bytes, far smaller error than activation quantization), "fp32" = float
    excluded_weights: str = "int8"
    holdout: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise GeosurgeError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise GeosurgeError(f"unknown calibration method {self.calibrate_method!r}; choose from "
                                f"{', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in QUANT_TYPES or self.weight_type not in QUANT_TYPES:
            raise GeosurgeError(f"activation/weight types must be one of {QUANT_TYPES}")
        if self.excluded_weights not in ("int8", "fp32"):
            raise GeosurgeError("excluded_weights must be int8 or fp32")
        if self.search not in (None, "auto"):
            raise GeosurgeError(f"unknown precision search {self.search!r} (use 'auto')")
        if self.search and self.precision not in ("int8", "int8-dynamic"):
            raise GeosurgeError("--precision-search auto applies to --precision int8 and int8-dynamic")

    @property
    def needs_calibration(self) -> bool:
        return self.precision in ("int8", "fp8")

    def to_dict(self) -> dict:
        return asdict(self)


def _ort_types(cfg: QuantConfig):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    qt = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}
    return qt[cfg.activation_type], qt[cfg.weight_type], cm[cfg.calibrate_method]


def session(path, threads: int | None = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_embeddings(path, inputs: np.ndarray, threads: int | None = 2, output: str = "embedding") -> np.ndarray:
    """Run a bundle-style model (static batch 1 or dynamic) over ``inputs`` one image at a time."""
    s = session(path, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run([output], {name: inputs[i:i + 1]})[0] for i in range(len(inputs))])


@contextlib.contextmanager
def _in_dir(path: Path):
    """quant_pre_process leaves temp files in the working directory when it fails: run it inside ``path``."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def prepare(src: Path, dst: Path) -> Path:
    """onnxruntime's ``quant_pre_process`` (graph optimisation + ONNX shape inference; its symbolic shape inference
    fails on these graphs, so it is skipped). Node names of the prepared graph are the ones quantization uses."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).absolute(), Path(dst).absolute()
    with _in_dir(dst.parent):
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def _structure(path) -> tuple[list[tuple], frozenset]:
    """(name, op_type, inputs, outputs) of every node and the initializer names, read once per file version (the
    search asks about the same prepared graph hundreds of times)."""
    st = Path(path).stat()
    return _structure_cached(str(Path(path).absolute()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _structure_cached(path: str, mtime_ns: int, size: int) -> tuple[list[tuple], frozenset]:
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    return ([(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in g.node],
            frozenset(t.name for t in g.initializer))


def quantizable_nodes(path, op_types=COMPUTE_OP_TYPES) -> list[dict]:
    nodes, inits = _structure(path)
    return [{"node": name, "op": op, "inputs": [i for i in ins if i and i not in inits],
             "weights": [i for i in ins if i in inits]}
            for name, op, ins, _ in nodes if op in op_types and not name.startswith(ALWAYS_FLOAT_PREFIXES)]


def with_followers(path, names: list[str]) -> list[str]:
    """``names`` plus the Clip/Relu nodes that directly consume their outputs (a clamp stays with its producer)."""
    nodes, _ = _structure(path)
    chosen = set(names)
    outputs = {o for name, _, _, outs in nodes if name in chosen for o in outs}
    extra = [name for name, op, ins, _ in nodes if op in FOLLOWER_OP_TYPES and outputs.intersection(ins)]
    return list(names) + [e for e in extra if e not in chosen]


def always_float_nodes(path) -> list[str]:
    return [name for name, _, _, _ in _structure(path)[0] if name.startswith(ALWAYS_FLOAT_PREFIXES)]


def convert_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and compute with float32 I/O (onnxruntime.transformers' converter); LayerNormalization is kept
    in float32 (it overflows in FP16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                     op_block_list=["LayerNormalization"])
    toposort(proto.graph)  # the converter appends its input casts at the end of the node list
    onnx.save(proto, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return {"converter": "onnxruntime.transformers.float16", "kept_float32": ["LayerNormalization"]}


def toposort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs (stable)."""
    nodes = list(graph.node)
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{produced_by[t] for t in n.input if t in produced_by} for n in nodes]
    done, order = [False] * len(nodes), []

    def visit(i):
        stack = [(i, iter(sorted(deps[i])))]
        while stack:
            j, it = stack[-1]
            nxt = next((d for d in it if not done[d]), None)
            if nxt is None:
                stack.pop()
                if not done[j]:
                    done[j] = True
                    order.append(nodes[j])
            else:
                stack.append((nxt, iter(sorted(deps[nxt]))))

    for i in range(len(nodes)):
        if not done[i]:
            visit(i)
    del graph.node[:]
    graph.node.extend(order)


def quantize_int8_static(prepared: Path, dst: Path, calib: np.ndarray | None, cfg: QuantConfig,
                         exclude: list[str] = (), cache: Path | None = None, only: list[str] | None = None) -> dict:
    """Static QDQ INT8 (per-channel weights). ``cache``: onnxruntime's JSON calibration cache, so repeated
    quantizations of the same graph (the precision search) calibrate once. ``only``: quantize just these nodes."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from geosurge.calibration.dataset import make_ort_reader

    act, wt, method = _ort_types(cfg)
    prepared, dst = Path(prepared).absolute(), Path(dst).absolute()
    cache = Path(cache).absolute() if cache else None
    excluded = sorted(set(with_followers(prepared, list(exclude))) | set(always_float_nodes(prepared)))
    with tempfile.TemporaryDirectory(prefix="geosurge-quant-") as td, _in_dir(Path(td)):
        quantize_static(str(prepared), str(dst), make_ort_reader(calib) if calib is not None else None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OP_TYPES),
                        per_channel=cfg.per_channel, activation_type=act, weight_type=wt,
                        calibrate_method=method, nodes_to_exclude=excluded,
                        nodes_to_quantize=with_followers(prepared, only) if only else None,
                        calibration_cache_path=str(cache) if cache else None,
                        extra_options={"OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OP_TYPES)})
    rewired = float_inputs(dst, FLOAT_INPUT_OP_TYPES)
    return {"quantizer": "onnxruntime.quantization.quantize_static (QDQ)", "op_types": list(STATIC_OP_TYPES),
            "per_channel": cfg.per_channel, "activation_type": cfg.activation_type,
            "weight_type": cfg.weight_type, "calibrate_method": cfg.calibrate_method, "nodes_excluded": excluded,
            "float_output_op_types": list(FLOAT_OUTPUT_OP_TYPES), "float_input_op_types": list(FLOAT_INPUT_OP_TYPES),
            "float_inputs_rewired": rewired}


def weight_only_int8(path: Path, names: list[str]) -> int:
    """Store the weights of nodes ``names`` (Conv / Gemm / MatMul with an initializer weight) as per-output-channel
    symmetric INT8 + DequantizeLinear; their compute stays float. Returns how many weights were converted."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    users = Counter(i for n in g.node for i in n.input)
    wanted, done, new_nodes = set(names), 0, []
    for n in g.node:
        if n.name not in wanted or len(n.input) < 2 or n.input[1] not in inits or users[n.input[1]] != 1:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        if n.op_type == "Conv":
            axis = 0
        elif n.op_type == "Gemm":
            axis = 0 if next((a.i for a in n.attribute if a.name == "transB"), 0) else 1
        elif n.op_type == "MatMul" and w.ndim == 2:
            axis = 1
        else:
            continue
        red = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=red) / 127.0).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        base = n.input[1]
        g.initializer.remove(inits[base])
        g.initializer.extend([numpy_helper.from_array(q, base + "_int8"),
                              numpy_helper.from_array(scale, base + "_scale"),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zero_point")])
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero_point"],
                                          [base], name=base + "_weight_only_DequantizeLinear", axis=axis))
        done += 1
    if done:
        for node in reversed(new_nodes):  # producers first: keep the graph topologically sorted
            g.node.insert(0, node)
        onnx.save(proto, str(path))
    return done


def float_inputs(path: Path, op_types) -> int:
    """Make ``op_types`` nodes read the float tensor behind a QuantizeLinear -> DequantizeLinear pair instead of its
    dequantized copy, then drop Q/DQ nodes left unused. Returns how many inputs were rewired."""
    import onnx

    proto = onnx.load(str(path))
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    rewired = 0
    for n in g.node:
        if n.op_type not in op_types:
            continue
        for i, t in enumerate(n.input):
            dq = producer.get(t)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
                rewired += 1
    if rewired:
        while True:  # prune Q/DQ nodes whose outputs nobody reads
            used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
            dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                    and not any(o in used for o in n.output)]
            if not dead:
                break
            for n in dead:
                g.node.remove(n)
        used = {t for n in g.node for t in n.input}
        for t in [t for t in g.initializer if t.name not in used]:
            g.initializer.remove(t)
        onnx.save(proto, str(path))
    return rewired


def quantize_int8_dynamic(prepared: Path, dst: Path, cfg: QuantConfig, exclude: list[str] = (),
                          only: list[str] | None = None) -> dict:
    """Dynamic INT8: weights quantized offline, activations at run time (MatMul only, see DYNAMIC_OP_TYPES). No
    calibration set needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = sorted(set(exclude) | set(always_float_nodes(prepared)))

    def renamed(names):  # a Gemm becomes "<name>_MatMul" inside quantize_dynamic
        return [m for n in names for m in (n, f"{n}_MatMul")]

    quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul"], per_channel=cfg.per_channel,
                     weight_type=QuantType.QInt8, nodes_to_exclude=renamed(excluded),
                     nodes_to_quantize=renamed(only) if only else None)
    return {"quantizer": "onnxruntime.quantization.quantize_dynamic", "op_types": list(DYNAMIC_OP_TYPES),
            "per_channel": cfg.per_channel, "weight_type": "int8", "nodes_excluded": excluded}


class _Quantizer:
    """One precision's quantize call with everything but the node choice fixed (what the search varies)."""

    def __init__(self, prepared: Path, cfg: QuantConfig, calib: np.ndarray | None, cache: Path | None):
        self.prepared, self.cfg, self.calib, self.cache = prepared, cfg, calib, cache
        self.op_types = COMPUTE_OP_TYPES if cfg.precision == "int8" else DYNAMIC_OP_TYPES
        #: nodes allowed weight-only INT8 when kept out of INT8 compute (None: all); set from measurements
        self.weight_only_ok: set[str] | None = None

    def __call__(self, dst: Path, exclude: list[str] = (), only: list[str] | None = None) -> dict:
        exclude = list(self.cfg.nodes_to_exclude) + list(exclude)
        if not only and {n["node"] for n in self.nodes()} <= set(exclude):  # nothing left to quantize
            import shutil

            shutil.copyfile(self.prepared, dst)
            facts = {"quantizer": "none (every quantizable node excluded)", "nodes_excluded": exclude}
        elif self.cfg.precision == "int8":
            facts = quantize_int8_static(self.prepared, dst, self.calib, self.cfg, exclude, self.cache, only)
        else:
            facts = quantize_int8_dynamic(self.prepared, dst, self.cfg, exclude, only)
        if not only and self.cfg.excluded_weights == "int8":
            ok = self._names() if self.weight_only_ok is None else self.weight_only_ok
            facts["weight_only_int8"] = weight_only_int8(dst, [n for n in exclude if n in ok])
        facts["excluded_weights"] = self.cfg.excluded_weights
        self.last_facts = facts
        return facts

    def _names(self) -> set[str]:
        return {n["node"] for n in quantizable_nodes(self.prepared, self.op_types)}

    def nodes(self) -> list[dict]:
        return [n for n in quantizable_nodes(self.prepared, self.op_types)
                if n["node"] not in self.cfg.nodes_to_exclude]


# ---- sensitivity and the search --------------------------------------------------------------------------------
def node_sensitivity(quantizer: _Quantizer, inputs: np.ndarray, workdir: Path, threads: int | None = 2,
                     log=print) -> list[dict]:
    """Per quantizable node, the error it causes alone: the graph with only that node quantized (static: with the
    shared calibration ranges) vs the float graph, on ``inputs``: 1 - mean embedding cosine. Worst first.

    Measured end to end rather than as a tensor's local SQNR: a node's local noise says little about how much of
    it survives to the embedding (local SQNR ranked these graphs' culprits poorly)."""
    ref = run_embeddings(quantizer.prepared, inputs, threads)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    trial = workdir / "sensitivity.onnx"
    nodes = quantizer.nodes()
    rows = []
    weights_too = quantizer.cfg.excluded_weights == "int8"
    for i, n in enumerate(nodes):
        quantizer(trial, only=[n["node"]])
        dep = run_embeddings(trial, inputs, threads)
        cos = (ref * dep).sum(1) / np.linalg.norm(dep, axis=1)
        row = {"node": n["node"], "op": n["op"], "error": float(1.0 - cos.mean()), "cosine_min": float(cos.min())}
        if weights_too:  # the same node with weight-only INT8 (float compute): may it keep INT8 weights?
            import shutil

            shutil.copyfile(quantizer.prepared, trial)
            if weight_only_int8(trial, [n["node"]]):
                dep = run_embeddings(trial, inputs, threads)
                row["weight_only_error"] = float(1.0 - ((ref * dep).sum(1) / np.linalg.norm(dep, axis=1)).mean())
        rows.append(row)
        if (i + 1) % 10 == 0 or i + 1 == len(nodes):
            log(f"  sensitivity: {i + 1}/{len(nodes)} nodes measured")
    trial.unlink(missing_ok=True)
    rows.sort(key=lambda r: (-r["error"], r["node"]))
    return rows


def check_gates(ref: np.ndarray, dep: np.ndarray, scorer, gates: dict | None) -> dict:
    from geosurge.parity import evaluate_gates, gates_passed, parity_metrics

    metrics = parity_metrics(ref, dep, scorer)
    rows = evaluate_gates(metrics, gates)
    return {"metrics": metrics, "gates": rows, "passed": gates_passed(rows)}


def _summary(rec: dict) -> str:
    m = rec["metrics"]
    return (f"cos mean {m['cosine_mean']:.4f} min {m['cosine_min']:.4f}, level agreement "
            f"{m['level_top1_agreement_min']:.3f}, top1-in-top5 {m['top1_in_top5']:.3f}, drift "
            f"{m['median_drift_km']:.1f} km -> {'PASS' if rec['passed'] else 'FAIL'}")


def search_precision(quantizer: _Quantizer, dst: Path, holdout: np.ndarray, scorer, workdir: Path,
                     gates: dict | None = None, threads: int | None = 2, sensitivity_images: int = 8,
                     ranking: list[dict] | None = None, log=print) -> dict:
    """All-INT8 first; if the gates fail on the held-out images, rank nodes by measured error and exclude the
    worst 1, 2, 4, ... until a mix passes, then bisect down to the smallest passing group. Writes the chosen mix to
    ``dst`` and returns the record for the manifest (``passed`` False, nothing written, when no mix passes)."""
    ref = run_embeddings(quantizer.prepared, holdout, threads)
    trial = workdir / "trial.onnx"
    steps = []

    def attempt(excluded: list[str], label: str | None = None) -> dict:
        quantizer(trial, excluded)
        rec = check_gates(ref, run_embeddings(trial, holdout, threads), scorer, gates)
        m = rec["metrics"]
        steps.append({"excluded": len(excluded), "passed": rec["passed"],
                      **{k: m[k] for k in ("cosine_mean", "cosine_min", "level_top1_agreement_min",
                                           "top1_in_top5", "median_drift_km")}})
        log(f"  {label or f'exclude {len(excluded):3d} node(s)'}: {_summary(rec)}")
        return rec

    t0 = time.perf_counter()
    rec = attempt([])
    result = {"method": "auto", "holdout_images": int(len(holdout)), "steps": steps, "ranking": [],
              "excluded_nodes": [], "passed": rec["passed"]}
    if rec["passed"]:
        os.replace(trial, dst)
        log(f"  all-INT8 passes the gates ({time.perf_counter() - t0:.1f}s)")
        return {**result, "check": rec}
    if ranking is None:
        log(f"  all-INT8 fails the gates: measuring each node's quantization error alone on {sensitivity_images} "
            "held-out image(s) ...")
        ranking = node_sensitivity(quantizer, holdout[:sensitivity_images], workdir, threads, log)
    result["ranking"] = ranking
    names = [r["node"] for r in ranking]
    if quantizer.cfg.excluded_weights == "int8":
        quantizer.weight_only_ok = {r["node"] for r in ranking
                                    if r.get("weight_only_error", np.inf) <= WEIGHT_ONLY_MAX_ERROR}
        log(f"  weight-only INT8 measured harmless (1-cos <= {WEIGHT_ONLY_MAX_ERROR:g}) for "
            f"{len(quantizer.weight_only_ok)} of {len(names)} node(s)")
    log("  worst nodes: " + ", ".join(f"{r['node']} (1-cos {r['error']:.2e})" for r in ranking[:5]))
    lo, k, best_k, best = 0, 1, None, None
    while names:
        k = min(k, len(names))
        rec = attempt(names[:k])
        if rec["passed"]:
            best_k, best = k, rec
            break
        lo = k
        if k == len(names):
            break
        k *= 2
    if best_k is None:
        log("  no mix passes the gates, even with every quantizable node in float")
        return {**result, "passed": False, "check": rec}
    hi = best_k  # bisect between the last failing and the first passing group size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rec = attempt(names[:mid])
        if rec["passed"]:
            hi, best = mid, rec
        else:
            lo = mid
    if quantizer.cfg.excluded_weights == "int8" and quantizer.weight_only_ok is not None:
        # compress further while the gates still pass: give weight-only INT8 to the kept-out nodes left in fp32,
        # least harmful first, keeping each only if the whole mix still passes on the held-out images
        extra = sorted((r for r in ranking if r["node"] in set(names[:hi]) and r["node"] not in quantizer.weight_only_ok
                        and "weight_only_error" in r), key=lambda r: r["weight_only_error"])
        for r in extra:
            quantizer.weight_only_ok.add(r["node"])
            rec = attempt(names[:hi], label=f"+ weight-only {r['node']}")
            if rec["passed"]:
                best = rec
            else:
                quantizer.weight_only_ok.discard(r["node"])
    if quantizer.weight_only_ok is not None:
        result["weight_only_nodes"] = sorted(set(names[:hi]) & quantizer.weight_only_ok)
    quantizer(dst, names[:hi])
    log(f"  chosen mix: {hi} of {len(names)} quantizable node(s) kept out of INT8 compute (weights "
        f"{quantizer.cfg.excluded_weights}; {time.perf_counter() - t0:.1f}s)")
    return {**result, "passed": True, "excluded_nodes": names[:hi], "check": best}


class PrecisionSearchFailed(GeosurgeError):
    def __init__(self, search: dict):
        self.search = search
        last = search["steps"][-1]
        super().__init__(f"precision search: no mix passes the parity gates (with every quantizable node in "
                         f"float: cosine mean {last['cosine_mean']:.4f}, level agreement "
                         f"{last['level_top1_agreement_min']:.3f}); not exported — use fp32/fp16, another "
                         "calibration set or method")


def apply_precision(fp32: Path, dst: Path, cfg: QuantConfig, workdir: Path, calibration=None, scorer=None,
                    gates: dict | None = None, threads: int | None = 2, check_set=None, log=print) -> dict:
    """FP32 ONNX -> ``dst`` at ``cfg.precision`` (onnxruntime target). Returns the manifest's ``quantization``
    record, with ``check``: parity vs the FP32 ONNX on images the quantizer did not calibrate on (int8: the
    calibration set's held-out split; otherwise ``check_set``)."""
    t0 = time.perf_counter()
    record: dict = {"precision": cfg.precision, "config": cfg.to_dict()}
    if cfg.precision == "fp32":
        os.replace(fp32, dst)
        return record
    if cfg.precision == "fp8":
        raise GeosurgeError("fp8 runs on TensorRT only: use --target tensorrt --precision fp8")
    check_inputs = None if check_set is None else check_set.inputs
    if cfg.precision == "fp16":
        record.update(convert_fp16(fp32, dst))
        reference = fp32
    else:
        # static QDQ wants onnxruntime's pre-processing (fusions, shapes); dynamic runs on the unfused export
        prepared = prepare(fp32, workdir / "prepared.onnx") if cfg.precision == "int8" else fp32
        reference = prepared
        calib = None
        if cfg.precision == "int8":
            if calibration is None:
                raise GeosurgeError("--precision int8 needs a calibration set (--calib DIR|MANIFEST)")
            cal, hold = calibration.split(cfg.holdout, cfg.seed)
            calib, check_inputs = cal.inputs, hold.inputs
            record["calibration"] = {**calibration.summary(), "calibration_images": len(cal),
                                     "holdout_images": len(hold)}
        quantizer = _Quantizer(prepared, cfg, calib, workdir / "calibration-ranges.json")
        if cfg.search == "auto":
            if scorer is None or check_inputs is None:
                raise GeosurgeError("the precision search needs the bundle's cell scorer and held-out images")
            log(f"precision search on {len(check_inputs)} held-out image(s)"
                + (f", calibrating on {len(calib)}" if calib is not None else "") + " ...")
            search = search_precision(quantizer, dst, check_inputs, scorer, workdir, gates, threads, log=log)
            if not search["passed"] and cfg.excluded_weights == "int8" and search["ranking"]:
                log("no mix passes with weight-only INT8 outside the INT8 compute: retrying with float weights")
                cfg = QuantConfig(**{**cfg.to_dict(), "excluded_weights": "fp32"})
                record["config"] = cfg.to_dict()
                quantizer = _Quantizer(prepared, cfg, calib, workdir / "calibration-ranges.json")
                search = search_precision(quantizer, dst, check_inputs, scorer, workdir, gates, threads,
                                          ranking=search["ranking"], log=log)
            record["check"] = _compact(search.pop("check"))
            record["search"] = search
            if not search["passed"]:
                raise PrecisionSearchFailed(search)
            record.update(quantizer.last_facts)  # the last quantization written was the chosen mix
        else:
            record.update(quantizer(dst))
    if "check" not in record and scorer is not None and check_inputs is not None:
        ref = run_embeddings(reference, check_inputs, threads)
        record["check"] = _compact(check_gates(ref, run_embeddings(dst, check_inputs, threads), scorer, gates))
    if "check" in record:
        record["check"]["images"] = int(len(check_inputs))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _compact(rec: dict) -> dict:
    m = {k: v for k, v in rec["metrics"].items() if k != "levels"}
    return {"metrics": m, "gates": rec["gates"], "passed": rec["passed"]}
