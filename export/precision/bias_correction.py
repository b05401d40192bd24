"""Bias correction of INT8 weights (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, section 4.2; the empirical form of their eq. 8-9).

Rounding a layer's weights ``W`` to ``W + dW`` (per-channel INT8) shifts its output by ``dW x``, whose mean over the
data, ``E[dW x] = dW E[x]``, is a systematic error per output channel: the layer's bias is effectively off by it,
and later layers amplify it. Where the inputs have a large mean (post-ReLU6 activations, a BatchNorm folded into the
weights with a large gain), that bias is most of the error. Subtracting ``dW E[x]`` from the bias removes it exactly
in expectation, at no run-time cost (the bias is already there).

``E[x]`` is the FP32 graph's, measured once per prepared graph on the calibration images: for a Conv, the mean over
images and output positions of the (padded) input value each kernel tap reads (``M[c, kh, kw]``: strides, pads,
dilations and groups as the Conv has them, so a zero-padded border counts as the Conv sees it), for a Gemm the mean
input row (a MatMul with a weight has no bias to move; onnxruntime's pre-processing fuses MatMul + Add into Gemm). Then
for any quantized graph of it (any mix of float and INT8 nodes, weight-only INT8 too), each node whose weight is an INT8
tensor through a DequantizeLinear gets ``bias -= sum dW * M`` (Conv, per output channel) or ``dW . m`` (Gemm); an INT32
bias (``s_in * s_w`` scale) moves by the nearest integer. What this does not correct: the mean error of *activation*
quantization (the sequential "empirical bias correction" of the same paper measured on the quantized graph; tried on the
reference model, it hurt mixes: 0.9875 -> 0.9931 cosine all-INT8, but 0.9976 -> 0.9945 with 8 nodes float, 0.9949 with
256 images).

Measured on the reference model (onnxruntime 1.32, 256 calibration images, 64 other views, mean embedding cosine
to FP32; ``benchmarks/int8_mixes.py``): all-INT8 PTQ 0.9720 -> 0.9878; 4 worst nodes float 0.9919 -> 0.9968; 8 float
0.9944 -> 0.9977; 12 float 0.9972 -> 0.9981; speed unchanged. Not for a QAT graph: QAT's student trained under the
rounded weights and its biases already absorbed their mean error.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: nodes whose weight (input 1) is an initializer and whose bias (input 2) can absorb the correction: what the
#: statistics are measured for (onnxruntime's pre-processing fuses a MatMul + Add into a Gemm)
WEIGHT_OPS = ("Conv", "Gemm")


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def input_means(prepared: Path, images, threads: int | None = 2, log=print) -> dict:
    """The FP32 input statistics of every weighted node of the prepared graph ``prepared`` over ``images`` (a
    CalibrationSet, read a batch at a time, or an (N, 3, S, S) float32 array): node name -> ``("Conv", M, W)`` with
    ``M`` (C_in, kh, kw) float64, the mean input value each kernel tap reads, or ``("Gemm", m, W)`` with ``m`` (K,)
    float64, the mean input row; ``W`` the node's FP32 weight (what rounding is measured against). One onnxruntime
    pass per image of the graph with, per Conv, a grouped one-hot Conv (C_in x kh x kw outputs) and a ReduceMean
    beside it. Raises GeosurgeError when the images are empty."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from geosurge.calibration.dataset import CalibrationSet
    from geosurge.errors import GeosurgeError

    n_img = len(images)
    if n_img == 0:
        raise GeosurgeError("bias correction: no calibration images")
    t0 = time.perf_counter()
    model = onnx.load(str(prepared))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new18 = _opset(model) >= 18  # ReduceMean takes its axes as an input from opset 18

    def reduce_mean(x, out, axes):
        if new18:
            name = out + "_axes"
            g.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
            return helper.make_node("ReduceMean", [x, name], [out], keepdims=0)
        return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=0)

    wanted, extra = [], []
    for n in list(g.node):
        if n.op_type not in WEIGHT_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w_shape = tuple(inits[n.input[1]].dims)
        tag = f"geosurge_bc_{len(wanted)}"
        if n.op_type == "Conv" and len(w_shape) == 4:
            a = _attrs(n)
            groups = int(a.get("group", 1))
            c_in, kh, kw = w_shape[1] * groups, w_shape[2], w_shape[3]
            onehot = np.zeros((c_in * kh * kw, 1, kh, kw), np.float32)
            taps = np.arange(kh * kw)
            for c in range(c_in):
                onehot[c * kh * kw + taps, 0, taps // kw, taps % kw] = 1.0
            g.initializer.append(numpy_helper.from_array(onehot, tag + "_onehot"))
            conv_attrs = {k: v for k, v in a.items() if k in ("pads", "strides", "dilations", "auto_pad")}
            extra.append(helper.make_node("Conv", [n.input[0], tag + "_onehot"], [tag + "_taps"], group=c_in,
                                          kernel_shape=[kh, kw], **conv_attrs))
            extra.append(reduce_mean(tag + "_taps", tag, [0, 2, 3]))
            wanted.append((n.name, "Conv", tag, (c_in, kh, kw), n.input[1]))
        elif n.op_type == "Gemm" and len(w_shape) == 2:
            axis = 1 if _attrs(n).get("transA", 0) else 0
            extra.append(reduce_mean(n.input[0], tag, [axis]))
            wanted.append((n.name, "Gemm", tag, None, n.input[1]))
    if not wanted:
        return {}
    g.node.extend(extra)
    for _, _, tag, _, _ in wanted:
        g.output.append(helper.make_tensor_value_info(tag, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    tags = [tag for _, _, tag, _, _ in wanted]
    take = images.batch if isinstance(images, CalibrationSet) else images.__getitem__
    sums = None
    for i in range(n_img):
        got = sess.run(tags, {in_name: take(slice(i, i + 1))})
        got = [r.astype(np.float64) for r in got]
        sums = got if sums is None else [s + r for s, r in zip(sums, got)]
    stats = {}
    for (name, op, _, shape, weight), s in zip(wanted, sums):
        mean = s / n_img
        stats[name] = (op, mean.reshape(shape) if shape else mean, numpy_helper.to_array(inits[weight]))
    log(f"  bias correction: FP32 input means of the {len(stats)} weighted node(s) (the INT8-weight ones are "
        f"corrected) over {n_img} image(s) in {time.perf_counter() - t0:.1f}s")
    return stats


def correct_biases(quantized: Path, stats: dict) -> dict:
    """Subtract each INT8-weight node's mean output error ``dW E[x]`` from its bias in the quantized graph
    ``quantized`` (rewritten in place; ``stats``: :func:`input_means` of the FP32 graph it was quantized from).
    A node is corrected when its weight comes through a DequantizeLinear of an INT8 initializer (QDQ static or
    weight-only INT8) and it has a bias (an INT32 one through a DequantizeLinear moves by the nearest integer of
    its scale; a float one exactly). Returns ``{"nodes": corrected, "without_bias": [...], "max_abs": the largest
    |correction| (output units)}``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(quantized))
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    done, no_bias, largest = 0, [], 0.0

    def dequantized(tensor: str):
        """The float value of an INT8 initializer behind a DequantizeLinear producing ``tensor``, else None."""
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            return None
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.dtype != np.int8:
            return None
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
              if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
        if scale.ndim:
            shape = [1] * q.ndim
            shape[_attrs(dq).get("axis", 1)] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return (q.astype(np.float64) - zp) * scale

    for n in g.node:
        if n.name not in stats or n.op_type not in WEIGHT_OPS:
            continue
        wq = dequantized(n.input[1])
        if wq is None:
            continue
        op, mean, w = stats[n.name]
        if wq.shape != w.shape:
            continue
        dw = wq - w.astype(np.float64)
        a = _attrs(n)
        if op == "Conv":
            groups = int(a.get("group", 1))
            c_out, cg = dw.shape[0], dw.shape[1]
            corr = np.einsum("gock,gck->go", dw.reshape(groups, c_out // groups, cg, -1),
                             mean.reshape(groups, cg, -1)).reshape(c_out)
        else:
            b = dw.T if a.get("transB", 0) else dw  # (K, N)
            corr = float(a.get("alpha", 1.0)) * (mean @ b) / float(a.get("beta", 1.0))
        if len(n.input) < 3 or not n.input[2]:
            no_bias.append(n.name)
            continue
        bias = n.input[2]
        if bias in inits:  # a float bias (weight-only INT8 nodes)
            b = numpy_helper.to_array(inits[bias])
            new = (b.astype(np.float64) - corr).astype(b.dtype)
            inits[bias].CopyFrom(numpy_helper.from_array(new, bias))
        else:
            dq = producer.get(bias)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                no_bias.append(n.name)
                continue
            qb = numpy_helper.to_array(inits[dq.input[0]])
            scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            new = qb.astype(np.int64) - np.rint(corr / scale).astype(np.int64)
            info = np.iinfo(qb.dtype)
            new = np.clip(new, info.min, info.max).astype(qb.dtype)
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(new, dq.input[0]))
        largest = max(largest, float(np.abs(corr).max()))
        done += 1
    if done:
        onnx.save(proto, str(quantized))
    return {"nodes": done, "without_bias": no_bias, "max_abs": round(largest, 6)}
