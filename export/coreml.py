"""Export target ``coreml``: a Core ML (iOS 17+ / macOS 14+ ML Program) package through ``torch.export`` (coremltools 9; the ``torch.jit.trace``
path of coremltools 9.0 fails with numpy 2.x: a size-1 array converted to a scalar).

The input is an ``ImageType`` (an app feeds a ``CVPixelBuffer``): Core ML applies one global ``scale`` and a
per-channel ``bias`` to the 0..255 pixels. The manifest's normalisation ``(x/255 - mean_c) / std_c`` is folded in
exactly when the std is the same for every channel; otherwise the per-channel std ratio is folded into a per-channel
affine at the head of the graph (a 1x1 scale, not an edit of the backbone's first layer). Outputs: ``embedding`` and,
with ``with_logits``, ``logits_<k>`` per level (in-model cell scoring for apps that want one file).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from geosurge.errors import GeosurgeError
from geosurge.formats import Format, Target, check_precision
from geosurge.manifest import MODEL_FILES, IOSection, ModelSection, QuantizationSection, TensorInfo

from .target import ExportJob, ExportTarget, TargetOutput
from .wrapper import INPUT_NAME, ExportWrapper, output_dims, output_names

class CoreMLTarget(ExportTarget):
    target = Target.COREML

    def export(self, model, job: ExportJob) -> TargetOutput:
        o = job.options
        name = MODEL_FILES[o.spec.format]
        t0 = time.perf_counter()
        facts = export_coreml(model, job.stage / name, o.precision.value, o.with_logits,
                              metadata={"hierarchy_digest": model.hierarchy.digest(),
                                        "embed_dim": model.config.head.embed_dim}, log=job.log)
        size = model.config.preprocess.size
        io = IOSection(inputs=[TensorInfo(INPUT_NAME, shape=[1, 3, size, size], layout="NCHW",
                                          type="image (RGB, 0..255; the manifest's normalisation is inside the model)")],
                       outputs=[TensorInfo(n, "float32", [1, d])
                                for n, d in zip(facts["outputs"], output_dims(model, o.with_logits))])
        section = ModelSection(format=Format.COREML, precision=o.precision, target=Target.COREML,
                               config=model.config.to_dict(), coreml=facts)
        quant = QuantizationSection(precision=o.precision, extra={
            "converter": "coremltools (torch.export)", "seconds": round(time.perf_counter() - t0, 1)})
        return TargetOutput(name, section, io, quant, {"coremltools": facts["coremltools"]})


def image_scale_bias(spec) -> tuple[float, list[float], list[float] | None]:
    """(scale, per-channel bias, per-channel gain or None) so that gain * (scale * pixel + bias) equals the
    manifest's normalisation of a 0..255 pixel."""
    mean, std = np.asarray(spec.mean, np.float64), np.asarray(spec.std, np.float64)
    if spec.channel_order != "RGB":
        raise GeosurgeError(f"Core ML export supports RGB preprocessing, not {spec.channel_order}")
    s0 = float(std.mean())
    scale = 1.0 / (255.0 * s0)
    if np.allclose(std, s0):
        return scale, [float(-m / s0) for m in mean], None
    # gain_c * (pixel / (255 s0) + b_c) = pixel / (255 std_c) - mean_c / std_c
    gain = s0 / std
    bias = -(mean / std) / gain
    return scale, [float(b) for b in bias], [float(g) for g in gain]


def export_coreml(model, path: Path, precision: str = "fp16", with_logits: bool = False, metadata: dict | None = None,
                  log=print) -> dict:
    """Convert ``model`` into an ``.mlpackage`` at ``path``; returns facts for the manifest."""
    try:
        import coremltools as ct
    except ImportError:
        raise GeosurgeError("--format coreml needs coremltools (pip install coremltools==9.0)") from None
    check_precision(Target.COREML, precision)
    model = model.eval()
    spec = model.config.preprocess
    size = spec.size
    scale, bias, gain = image_scale_bias(spec)
    wrapper = ExportWrapper(model, with_logits, gain).eval()
    x = torch.zeros(1, 3, size, size)
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(wrapper, (x,)).run_decompositions({})
    names = output_names(model, with_logits)
    mlmodel = ct.convert(
        exported, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
        inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 3, size, size), scale=scale, bias=bias,
                             color_layout=ct.colorlayout.RGB)],
        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in names],
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    if precision == "int8-weights":
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel")))
    elif precision == "palettize4":
        from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

        mlmodel = palettize_weights(mlmodel, OptimizationConfig(global_config=OpPalettizerConfig(nbits=4,
                                                                                                 mode="kmeans")))
    meta = {"com.geosurge.schema": "geosurge.bundle", "com.geosurge.preprocess": json.dumps(spec.to_dict()),
            **{f"com.geosurge.{k}": str(v) for k, v in (metadata or {}).items()}}
    mlmodel.user_defined_metadata.update(meta)
    what = "embedding + per-level logits" if with_logits else "L2-normalised embedding"
    mlmodel.short_description = f"GeoSURGE {model.config.name}: image -> {what}"
    mlmodel.save(str(path))
    dt = time.perf_counter() - t0
    facts = inspect_mlpackage(path)
    facts.update({"precision": precision, "image_scale": scale, "image_bias": bias, "channel_gain": gain,
                  "outputs": names, "convert_seconds": round(dt, 1), "deployment_target": "iOS17 / macOS14",
                  "coremltools": ct.__version__})
    log(f"Core ML: mlprogram {precision}, {facts['ops_total']} ops, {facts['bytes'] / 1e6:.1f} MB in {dt:.1f}s")
    return facts


def inspect_mlpackage(path: Path) -> dict:
    """Spec facts without loading the model for prediction (works on Linux): inputs, outputs, op histogram, weight
    storage dtypes, size, metadata."""
    import coremltools as ct

    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    ops = Counter()
    dtypes = Counter()
    for f in spec.mlProgram.functions.values():
        for blk in f.block_specializations.values():
            for op in blk.operations:
                ops[op.type] += 1
                if op.type.startswith("constexpr"):  # compressed weights: the stored data's dtype
                    for key, val in op.attributes.items():
                        if val.type.HasField("tensorType") and key in ("quantized_data", "indices", "lut", "data"):
                            dtypes[f"{key}:{ct.proto.MIL_pb2.DataType.Name(val.type.tensorType.dataType)}"] += 1
                elif op.type == "const":
                    for out in op.outputs:
                        if out.type.HasField("tensorType") and out.type.tensorType.rank >= 1:
                            dtypes[f"const:{ct.proto.MIL_pb2.DataType.Name(out.type.tensorType.dataType)}"] += 1
    inputs = []
    for i in spec.description.input:
        kind = i.type.WhichOneof("Type")
        rec = {"name": i.name, "type": kind}
        if kind == "imageType":
            rec.update(width=i.type.imageType.width, height=i.type.imageType.height,
                       color=ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(i.type.imageType.colorSpace))
        inputs.append(rec)
    outputs = [{"name": o.name, "type": o.type.WhichOneof("Type"), "shape": list(o.type.multiArrayType.shape),
                "dtype": ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(o.type.multiArrayType.dataType)}
               for o in spec.description.output]
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return {"inputs": inputs, "outputs_spec": outputs, "ops": dict(ops.most_common()), "ops_total": sum(ops.values()),
            "weight_dtypes": dict(dtypes), "bytes": size, "spec_version": spec.specificationVersion,
            "metadata": dict(spec.description.metadata.userDefined)}
