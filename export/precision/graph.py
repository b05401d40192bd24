"""Reading and editing the ONNX graph for quantization: which nodes are quantizable, their clamps, the cell head's
nodes, topological order, weight-only INT8, and float inputs rewired around Q/DQ pairs."""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from .config import ALWAYS_FLOAT_PREFIXES, COMPUTE_OP_TYPES, FLOAT_ACTIVATION_MATMULS, FOLLOWER_OP_TYPES


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


def _always_float(name: str, op: str, ins: tuple, inits: frozenset) -> bool:
    """A node no precision quantizes: the cell head's (by name), and a MatMul of two activations (no initializer
    input) when :data:`~.config.FLOAT_ACTIVATION_MATMULS`."""
    if name.startswith(ALWAYS_FLOAT_PREFIXES):
        return True
    return FLOAT_ACTIVATION_MATMULS and op == "MatMul" and not any(i in inits for i in ins)


def quantizable_nodes(path, op_types=COMPUTE_OP_TYPES) -> list[dict]:
    nodes, inits = _structure(path)
    return [{"node": name, "op": op, "inputs": [i for i in ins if i and i not in inits],
             "weights": [i for i in ins if i in inits]}
            for name, op, ins, _ in nodes if op in op_types and not _always_float(name, op, ins, inits)]


def with_followers(path, names: list[str]) -> list[str]:
    """``names`` plus the Clip/Relu nodes that directly consume their outputs (a clamp stays with its producer)."""
    nodes, _ = _structure(path)
    chosen = set(names)
    outputs = {o for name, _, _, outs in nodes if name in chosen for o in outs}
    extra = [name for name, op, ins, _ in nodes if op in FOLLOWER_OP_TYPES and outputs.intersection(ins)]
    return list(names) + [e for e in extra if e not in chosen]


def check_node_names(path, names, option: str = "--exclude-nodes") -> None:
    """Raise GeosurgeError naming every one of ``names`` that is not a node of the graph at ``path`` (with the
    closest names it has): a node kept float by a name that matches nothing would be recorded as kept float
    while it is quantized."""
    import difflib

    from geosurge.errors import GeosurgeError

    nodes, _ = _structure(path)
    have = [name for name, _, _, _ in nodes]
    known = set(have)
    unknown = [n for n in dict.fromkeys(names) if n not in known]
    if not unknown:
        return
    hints = []
    for n in unknown[:5]:
        close = difflib.get_close_matches(n, have, n=2, cutoff=0.6)
        hints.append(f"{n!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    raise GeosurgeError(f"{option}: {len(unknown)} name(s) are not nodes of the graph: {'; '.join(hints)}"
                        + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                        + ". Names are the ONNX node names of the graph onnxruntime quantizes, e.g. "
                        "'/backbone/conv_stem/Conv'; an INT8 bundle's manifest lists the quantizable ones "
                        "(quantization.search.ranking, with --precision-search auto)")


def always_float_nodes(path) -> list[str]:
    """Names of the nodes of ``path`` that stay float whatever is asked (:func:`_always_float`)."""
    nodes, inits = _structure(path)
    return [name for name, op, ins, _ in nodes if _always_float(name, op, ins, inits)]


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
