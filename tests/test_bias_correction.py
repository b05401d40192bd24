"""Bias correction of INT8 weights (``geosurge.export.precision.bias_correction``) on hand-built graphs: the
quantized graphs dequantize their weights and run in float, so nothing here depends on a CPU's INT8 kernels."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from geosurge.export.precision.bias_correction import correct_biases, input_means


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _graphs(tmp_path, rng, opset=17):
    """An FP32 graph Conv (groups 2, stride 2, pads 1, 3x3) -> Gemm (transB, alpha / beta != 1), and its copy with
    per-channel INT8 weights through DequantizeLinear: the Conv's bias INT32 (scale s_in * s_w, as onnxruntime's
    QDQ quantizer writes it), the Gemm's float (as weight-only INT8 leaves it). The weights are coarse (a few
    levels) so that rounding them makes a clear mean error on positive inputs."""
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    g_w = rng.normal(size=(5, 16)).astype(np.float32)  # (N, K) with transB
    g_b = rng.normal(size=5).astype(np.float32)
    alpha, beta = 0.5, 2.0

    def build(path, conv_w, conv_b, gemm_w, gemm_b, extra_inits=(), extra_nodes=()):
        nodes = [*extra_nodes,
                 helper.make_node("Conv", ["x", conv_w, conv_b], ["c"], name="conv", group=2, strides=[2, 2],
                                  pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
                 helper.make_node("Reshape", ["c", "shape"], ["flat"], name="flat"),
                 helper.make_node("Gemm", ["flat", gemm_w, gemm_b], ["y"], name="gemm", transB=1, alpha=alpha,
                                  beta=beta)]
        inits = [numpy_helper.from_array(np.array([1, 16], np.int64), "shape"), *extra_inits]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
        return path

    fp32 = build(tmp_path / "fp32.onnx", "w", "b", "gw", "gb",
                 [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                  numpy_helper.from_array(g_w, "gw"), numpy_helper.from_array(g_b, "gb")])
    sw = np.abs(w).reshape(4, -1).max(1) / 3.0  # 3 levels a side: a coarse grid, a visible error
    qw = np.clip(np.rint(w / sw[:, None, None, None]), -127, 127).astype(np.int8)
    s_in = np.float32(0.05)
    sb = (s_in * sw).astype(np.float32)
    qb = np.rint(b / sb).astype(np.int32)
    sg = np.abs(g_w).max(1) / 3.0
    qg = np.clip(np.rint(g_w / sg[:, None]), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(qw, "qw"), numpy_helper.from_array(sw.astype(np.float32), "sw"),
             numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
             numpy_helper.from_array(qb, "qb"), numpy_helper.from_array(sb, "sb"),
             numpy_helper.from_array(np.zeros(4, np.int32), "zb"),
             numpy_helper.from_array(qg, "qg"), numpy_helper.from_array(sg.astype(np.float32), "sg"),
             numpy_helper.from_array(np.zeros(5, np.int8), "zg"), numpy_helper.from_array(g_b, "gb")]
    dq = [helper.make_node("DequantizeLinear", ["qw", "sw", "zw"], ["w_dq"], axis=0),
          helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["b_dq"], axis=0),
          helper.make_node("DequantizeLinear", ["qg", "sg", "zg"], ["g_dq"], axis=0)]
    quant = build(tmp_path / "q.onnx", "w_dq", "b_dq", "g_dq", "gb", inits, dq)
    # the Gemm alone in INT8 (the Conv float): its input is then exactly the FP32 one
    gemm_only = build(tmp_path / "q-gemm.onnx", "w", "b", "g_dq", "gb",
                      [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), *inits[6:]], dq[2:])
    return fp32, quant, gemm_only


def _channel_means(path, xs, out="c"):
    m = onnx.load(str(path))
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = [s.run([out, "y"], {"x": x[None]}) for x in xs]
    return np.mean([c.mean(axis=(0, 2, 3)) for c, _ in got], 0), np.mean([y[0] for _, y in got], 0)


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute, then an input from opset 18
def test_bias_correction_removes_the_mean_error_of_rounded_weights(tmp_path, opset):
    """``input_means`` measures the mean input each kernel tap reads (zero padding, stride and groups as the Conv
    has them): ``sum dW * M`` equals the mean of the Conv of the inputs with the weight error ``dW``. Corrected,
    the quantized graph's mean Conv output per channel matches FP32 to the INT32 bias step (it was off by many),
    and a Gemm's (float bias, alpha / beta) to float precision when its input is the FP32 one. (Downstream of a
    quantized Conv the Gemm still sees that Conv's per-position errors: the correction is per channel.)"""
    rng = np.random.default_rng(0)
    fp32, quant, gemm_only = _graphs(tmp_path, rng, opset)
    xs = (rng.uniform(0, 6, size=(64, 6, 4, 4)) + np.arange(6)[:, None, None]).astype(np.float32)  # positive means
    stats = input_means(fp32, xs, threads=1, log=lambda m: None)
    assert set(stats) == {"conv", "gemm"} and stats["conv"][1].shape == (6, 3, 3) and stats["gemm"][1].shape == (16,)
    # the taps' means: the padded border reads zeros (the corner tap of output (0, 0) is padding)
    pad = np.pad(xs.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.stack([pad[:, :, kh:kh + 4:2, kw:kw + 4:2].mean(axis=(0, 2, 3)) for kh in range(3) for kw in range(3)], 1)
    np.testing.assert_allclose(stats["conv"][1].reshape(6, 9), want, rtol=1e-5)

    fp_c, fp_y = _channel_means(fp32, xs)
    q_c, q_y = _channel_means(quant, xs)
    before = np.abs(q_c - fp_c)
    rec = correct_biases(quant, stats)
    assert rec["nodes"] == 2 and rec["without_bias"] == []
    c_c, c_y = _channel_means(quant, xs)
    step = next(numpy_helper.to_array(t) for t in onnx.load(str(quant)).graph.initializer if t.name == "sb")
    assert before.max() > 20 * step.max()  # the rounded weights' mean error is many bias steps
    assert np.all(np.abs(c_c - fp_c) <= 0.5 * step + 1e-4)

    _, g_y = _channel_means(gemm_only, xs)
    assert correct_biases(gemm_only, stats)["nodes"] == 1  # the float Conv is left alone
    _, gc_y = _channel_means(gemm_only, xs)
    assert np.abs(g_y - fp_y).max() > 0.5 and np.abs(gc_y - fp_y).max() < 1e-3


def test_bias_correction_leaves_float_nodes_alone(tmp_path):
    """A node whose weight is float (kept out of INT8) has no rounding error to correct: its bias is untouched;
    a statistic measured for a node the graph no longer has is ignored."""
    rng = np.random.default_rng(1)
    fp32, _, _ = _graphs(tmp_path, rng)
    xs = rng.uniform(0, 6, size=(8, 6, 4, 4)).astype(np.float32)
    stats = input_means(fp32, xs, threads=1, log=lambda m: None)
    stats["gone"] = ("Gemm", np.zeros(3), np.zeros((3, 3), np.float32))
    before = onnx.load(str(fp32)).SerializeToString()
    rec = correct_biases(fp32, stats)
    assert rec["nodes"] == 0 and onnx.load(str(fp32)).SerializeToString() == before
    with pytest.raises(Exception, match="no calibration images"):
        input_means(fp32, xs[:0], log=lambda m: None)
