"""Quantization-aware distillation (QAT): the FP32 model is the teacher, a fake-quantized copy of it the student,
trained on unlabelled images to reproduce the teacher's embedding and per-level cell distributions through INT8
rounding (straight-through gradients).

What ships is the student's **FP32 weights**, quantized again by onnxruntime's own static QDQ (:mod:`.ort_static`:
U8 activations, S8 per-channel weights after ``quant_pre_process`` — the layout onnxruntime's CPU kernels run fast;
nvidia-modelopt's QDQ ONNX is TensorRT-shaped and ran slower than FP32 on onnxruntime CPU). For the tuned weights to
survive that second quantization the student must be trained under *onnxruntime's* scheme, so the fake quantizers
mirror it (torch.ao fake-quantize ops):

* the input of every Conv / Linear (what onnxruntime quantizes: Conv / MatMul / Gemm inputs): per-tensor,
  **asymmetric uint8**, range = min / max over the calibration images including 0 (onnxruntime's MinMax), fixed
  between refreshes: the export calibrates the *tuned* weights again, so the ranges are observed again over all
  the images every ``range_every`` steps and at the end (see :class:`QATConfig`);
* their weights: per output channel, symmetric int8, scale = max |w| / 127 recomputed from the current weights every
  step (onnxruntime computes it from the final weights); with ``reduce_range`` onnxruntime's 7-bit grid is
  [-64, 64] with scale max |w| / 64 (``quant_utils.ONNX_INT_TYPE_REDUCED_RANGE``), not [-63, 63]: a student trained
  on the other grid has its weights rounded afresh by the export (measured on the reference model with this and the
  next mismatch: 800 steps took the student's error from 1.1e-1 to 6.2e-3 and left the deployed INT8 at cosine
  0.909; with both fixed, 0.979);
* the output of every BatchNorm with its activation (timm's ``BatchNormAct2d``) that follows a quantized Conv:
  onnxruntime folds the BatchNorm into the Conv and quantizes every Conv output (conv chains run as QLinearConv),
  also the projection convolutions that feed a residual Add (14 of 51 Conv outputs in the reference model), which
  quantizing Conv inputs alone never sees. Where the next Conv reads that output the two quantizers share one range
  (same tensor, same observed min / max), so the second one changes nothing;
* the cell head (tables, temperatures) frozen and float: the bundle's cell table is the FP32 model's.

Measured (tiny config, onnxruntime's reference QDQ arithmetic): nvidia-modelopt's INT8 config instead (symmetric
int8 activations, its own choice of quantized modules) trained weights whose onnxruntime INT8 was *worse* than plain
PTQ (1 - cos 1.7e-3 vs 1.0e-4): the scheme must match. Whether the gain survives is measured on every export, not
assumed: the QAT graph's INT8 is compared with plain PTQ's on images neither saw (the manifest's ``qat`` record).

BatchNorm statistics stay frozen (the model is in eval mode): small batches would corrupt them.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from geosurge.errors import GeosurgeError


@dataclass
class QATConfig:
    """``steps`` optimizer steps of ``batch`` images (random horizontal flips) at ``lr`` (AdamW, cosine decay);
    loss = (1 - cosine to the teacher's embedding) + ``kl_weight`` x mean over levels of KL(teacher || student) of
    the per-level cell distributions + ``rank_weight`` x :func:`rank_loss` (the teacher's top-``rank_top`` finest
    cells of the hierarchical product: the student's score gaps to the teacher's top-1 against the teacher's, in
    logits squared). ``weight_bits`` 8 (per-channel symmetric, as onnxruntime quantizes weights) or
    7 (onnxruntime's ``reduce_range``, which no x86 u8s8 kernel can saturate)."""

    steps: int = 200
    batch: int = 8
    lr: float = 2e-5
    kl_weight: float = 1.0
    #: weight of :func:`rank_loss` (0: off). What the parity gates measure is the ranking of the finest cells (top-1
    #: agreement, the drift to FP32's near-ties), which the embedding cosine and per-level KL reach only indirectly
    rank_weight: float = 0.0
    rank_top: int = 16
    weight_bits: int = 8
    seed: int = 0
    #: modules left float (:func:`insert_fake_quant`'s ``exclude``): the Conv / Linear of the ONNX nodes kept out of
    #: INT8 (``--exclude-nodes``), so that the student trains for the mix the export deploys
    exclude: list[str] = field(default_factory=list)
    #: re-observe the activation ranges over all the images (onnxruntime's MinMax, which the export runs on the
    #: tuned weights) every this many steps and after the last (None: steps // 4; 0: never, the ranges of the
    #: starting weights throughout). Measured on the reference model (1,024 views, 1,500 steps, ranges never
    #: refreshed): the ranges onnxruntime calibrated on the tuned weights differed by > 5% for 15% of the
    #: quantizers, up to 8.3x (the segmentation branch's output, clipped in training at the old range)
    range_every: int | None = None
    #: torch device for the fine-tuning: None = CUDA when available (QAT is training: a GPU makes minutes seconds),
    #: else CPU
    device: str | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1:
            raise GeosurgeError("--qat-steps and the QAT batch must be >= 1")
        if self.range_every is None:
            self.range_every = max(1, self.steps // 4)
        if self.range_every < 0:
            raise GeosurgeError("QAT range_every must be >= 0 (0: ranges never refreshed)")
        if self.weight_bits not in (7, 8):
            raise GeosurgeError("QAT weight bits must be 8 or 7 (reduce_range)")
        if self.rank_weight < 0 or self.rank_top < 2:
            raise GeosurgeError("QAT rank_weight must be >= 0 and rank_top >= 2")
        if not self.lr > 0:
            raise GeosurgeError("the QAT learning rate must be > 0")


def _fake_quant_modules():
    """The student's fake quantizers (defined when torch is imported): activations and weights as onnxruntime."""
    import torch
    from torch import nn

    class WeightQuant(nn.Module):
        """Per-output-channel symmetric fake quantization of a weight (a parametrization): the scale follows the
        weight, as onnxruntime computes it from the final weights."""

        def __init__(self, bits: int):
            super().__init__()
            self.qmax = 127 if bits == 8 else 64  # onnxruntime: symmetric [-127, 127]; reduce_range [-64, 64]
            self.enabled = True  # False: the weight passes unrounded (what one quantizer costs: an analysis)

        def forward(self, w):
            if not self.enabled:
                return w
            amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
            scale = (amax / self.qmax).float()
            return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                          -self.qmax, self.qmax)

    class ActQuant(nn.Module):
        """Per-tensor asymmetric uint8 fake quantization of a module's input: observe min / max (with 0) while
        calibrating, then fixed."""

        def __init__(self):
            super().__init__()
            self.register_buffer("lo", torch.tensor(0.0))
            self.register_buffer("hi", torch.tensor(0.0))
            self.scale, self.zero_point = None, 0
            self.enabled = True  # False: the tensor passes unrounded (an analysis; the range is kept)

        def freeze(self):
            self.scale = float(max((self.hi - self.lo).item() / 255.0, 1e-12))
            self.zero_point = int(min(255, max(0, round(-self.lo.item() / self.scale))))

        def observe(self):
            """Start observing afresh (the range of the current weights' activations)."""
            self.lo, self.hi = torch.zeros_like(self.lo), torch.zeros_like(self.hi)
            self.scale = None

        def forward(self, x):
            if self.scale is None:  # calibrating
                self.lo = torch.minimum(self.lo, x.detach().min())
                self.hi = torch.maximum(self.hi, x.detach().max())
                return x
            if not self.enabled:
                return x
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)

    return WeightQuant, ActQuant


def module_of_onnx_node(node: str) -> str:
    """The torch module path an ONNX node name of torch's TorchScript exporter is scoped under (what
    ``--exclude-nodes`` and the precision search name): ``/backbone/blocks/blocks.0/blocks.0.0/conv_dw/Conv`` ->
    ``backbone.blocks.0.0.conv_dw`` (each scope segment repeats its parent's name with the child's appended; the
    last part is the op). Names onnxruntime's pre-processing keeps (a Conv with its BatchNorm folded in keeps the
    Conv's). Returns "" for a node at the top level."""
    out: list[str] = []
    for seg in [p for p in node.split("/") if p][:-1]:
        comps = seg.split(".")
        if len(comps) > 1 and out and comps[:-1] == out[len(out) - len(comps) + 1:]:
            out.append(comps[-1])  # "blocks.0" under "blocks": the child "0"
        else:
            out.extend(comps)
    return ".".join(out)


def modules_of_onnx_nodes(nodes, modules) -> dict[str, str | None]:
    """Each ONNX node name -> the module of ``modules`` (e.g. :func:`compute_modules`) it was exported from, or None
    when it has none of its own (an attention MatMul of two activations). The scope path
    (:func:`module_of_onnx_node`) names a module exactly, or skips modules whose ``forward`` was not called as a
    module (timm's ``self.model.forward_features(x)`` records no ``model`` scope: ``/backbone/conv_stem/Conv`` is
    ``backbone.model.conv_stem``): then the one module whose path holds the scope's parts in order, with the same
    first and last part. Raises GeosurgeError naming a node that fits several modules."""
    modules = set(modules)
    out: dict[str, str | None] = {}
    for node in nodes:
        path = module_of_onnx_node(node)
        if path in modules or not path:
            out[node] = path or None
            continue
        want = path.split(".")
        fits = [m for m in modules if _holds_in_order(m.split("."), want)]
        if len(fits) > 1:
            raise GeosurgeError(f"ONNX node {node!r} fits {len(fits)} modules ({', '.join(sorted(fits)[:3])})")
        out[node] = fits[0] if fits else None
    return out


def _holds_in_order(parts: list[str], want: list[str]) -> bool:
    if not want or parts[0] != want[0] or parts[-1] != want[-1]:
        return False
    it = iter(parts)
    return all(w in it for w in want)


def compute_modules(model) -> set[str]:
    """Names of the Conv2d / Linear modules outside the cell head: what QAT fake-quantizes."""
    from torch import nn

    return {name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and not name.startswith("head")}


def insert_fake_quant(model, weight_bits: int = 8, exclude=()) -> list:
    """Fake quantizers on every Conv2d / Linear outside the cell head (in place): input (asymmetric uint8,
    observing until :func:`freeze_ranges` / :func:`observe_ranges` fix it) and weight (per channel); and on the
    output of every BatchNorm that carries its activation (timm's ``BatchNormAct2d``, identity or not) outside the
    head, which is where onnxruntime quantizes the output of the Conv it folds the BatchNorm (and a Clip / Relu)
    into. A plain
    ``nn.BatchNorm2d`` is not covered: whether an activation module follows it is not known from the module tree.

    ``exclude``: module names (:func:`modules_of_onnx_nodes` of the ONNX nodes kept out of INT8 compute, with float
    weights) left float as onnxruntime leaves them (seen in its QDQ graph of such a mix): no input or weight
    quantizer, and the output of their BatchNorm (the first that runs after them) not quantized; a tensor a
    kept-out node shares with a quantized neighbour is still rounded by that neighbour's quantizer. Raises
    GeosurgeError naming an ``exclude`` entry that is no Conv2d / Linear outside the head. Returns the activation
    quantizers."""
    from torch import nn
    from torch.nn.utils import parametrize

    WeightQuant, ActQuant = _fake_quant_modules()
    exclude = set(exclude)
    compute = compute_modules(model)
    unknown = sorted(exclude - compute)
    if unknown:
        raise GeosurgeError(f"QAT: {unknown[0]!r} is not a Conv2d / Linear of the model outside the cell head "
                            f"({len(unknown)} such name(s))")
    last = {"conv": None}  # the Conv2d / Linear that ran last: the producer of the next BatchNorm's output

    def ran(name):
        def hook(m, args):
            last["conv"] = name
        return hook

    def output(m, args, out):
        q = m.output_quantizer
        if q.producer is None:  # the first forward: which Conv made this output
            q.producer = last["conv"] or ""
        return out if q.producer in exclude else q(out)

    acts = []
    for name, mod in model.named_modules():
        if name.startswith("head"):
            continue
        if name in compute:
            mod.register_forward_pre_hook(ran(name))
            if name in exclude:
                continue
            aq = ActQuant()
            mod.add_module("input_quantizer", aq)
            mod.register_forward_pre_hook(lambda m, args: (m.input_quantizer(args[0]), *args[1:]))
            parametrize.register_parametrization(mod, "weight", WeightQuant(weight_bits))
            acts.append(aq)
        elif isinstance(mod, nn.BatchNorm2d) and isinstance(getattr(mod, "act", None), nn.Module):
            oq = ActQuant()
            oq.producer = None
            mod.add_module("output_quantizer", oq)
            mod.register_forward_hook(output)
            acts.append(oq)
    return acts


def quantizer_groups(student) -> dict[str, list]:
    """Per Conv2d / Linear that ``student`` (after :func:`insert_fake_quant` and one forward pass, which tells each
    BatchNorm output quantizer its producer) quantizes: its input quantizer, its weight quantizer and the BatchNorm
    output quantizers of its outputs, in module order — what keeping that node float (``exclude``) takes away. Each
    quantizer has an ``enabled`` switch. Raises GeosurgeError before that forward pass."""
    from torch.nn.utils import parametrize

    groups: dict[str, list] = {}
    for name, mod in student.named_modules():
        if parametrize.is_parametrized(mod, "weight") and hasattr(mod, "input_quantizer"):
            groups[name] = [mod.input_quantizer, mod.parametrizations.weight[0]]
    for mod in student.modules():
        q = getattr(mod, "output_quantizer", None)
        if q is None:
            continue
        if q.producer is None:
            raise GeosurgeError("quantizer_groups: run the student once first (which Conv makes each output)")
        if q.producer in groups:
            groups[q.producer].append(q)
    return groups


def freeze_ranges(acts) -> None:
    """End calibration: each input quantizer's range is fixed from what it observed."""
    for a in acts:
        a.freeze()


def observe_ranges(model, acts, x_all, chunk: int = 16) -> np.ndarray:
    """(Re-)observe every activation quantizer's range as onnxruntime's MinMax calibration does: min / max (with 0)
    over all of ``x_all`` through ``model`` as it is now, then fixed. Returns the ranges (len(acts), 2) float64."""
    import torch

    for a in acts:
        a.observe()
    with torch.no_grad():
        for i in range(0, len(x_all), chunk):
            model.embed(x_all[i:i + chunk])
    freeze_ranges(acts)
    return np.array([[a.lo.item(), a.hi.item()] for a in acts], np.float64)


def range_drift(old: np.ndarray, new: np.ndarray) -> float:
    """The largest relative change of a range's span between two observations (0: the same ranges)."""
    a, b = old[:, 1] - old[:, 0], new[:, 1] - new[:, 0]
    ok = np.maximum(a, b) > 0
    return float(np.max(np.abs(b[ok] - a[ok]) / np.maximum(a[ok], b[ok]), initial=0.0))


def _level_log_probs(model, emb):
    import torch.nn.functional as F

    return [F.log_softmax(z, dim=-1) for z in model.head.level_logits(emb)]


def rank_loss(head, student_log_probs, teacher_log_probs, top: int = 16):
    """Mean squared error (logits^2) of the score gaps ``S(f_1) - S(f_i)`` of the teacher's top-``top`` finest cells
    ``f_1..f_top`` (``S`` the hierarchical product's log score, :meth:`CellHead.hierarchical_scores`), student vs
    teacher: zero when the student ranks those cells as the teacher does, by the same margins. Per-level log-probs
    are lists of (B, n_k) tensors; returns a scalar tensor."""
    s_t = head.hierarchical_scores(teacher_log_probs)
    s_s = head.hierarchical_scores(student_log_probs)
    idx = s_t.topk(min(top, s_t.shape[1]), dim=-1).indices
    g_t = s_t.gather(1, idx[:, :1]) - s_t.gather(1, idx)
    g_s = s_s.gather(1, idx[:, :1]) - s_s.gather(1, idx)
    return (g_s - g_t).pow(2)[:, 1:].mean()


class _Images:
    """Float32 model inputs on ``device`` by index or slice, from a preprocessed (N, 3, S, S) float32 array or from
    a :class:`~geosurge.calibration.dataset.CalibrationSet` (uint8 pixels, preprocessed per batch as read: the set
    stays a quarter of its float32 size in memory)."""

    def __init__(self, images, device):
        import torch

        from geosurge.calibration.dataset import CalibrationSet

        self.device, self.torch = device, torch
        self.set = images if isinstance(images, CalibrationSet) else None
        # an array is one tensor on the device, indexed as it is (what QAT always did with arrays)
        self.all = (None if self.set is not None
                    else torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))

    def __len__(self) -> int:
        return len(self.set) if self.set is not None else len(self.all)

    def __getitem__(self, idx):
        if self.set is None:
            return self.all[idx]
        if not isinstance(idx, slice):
            idx = np.asarray(idx.cpu() if hasattr(idx, "cpu") else idx, np.int64)
        return self.torch.from_numpy(self.set.batch(idx)).to(self.device)


def qat_distill(model, images, cfg: QATConfig | None = None, log=print, init=None):
    """Fine-tune a fake-quantized copy of ``model`` (a GeoSurge, FP32, the teacher; left unchanged) on ``images``
    (unlabelled: a :class:`~geosurge.calibration.dataset.CalibrationSet`, read a batch at a time, or an (N, 3, S, S)
    float32 array, preprocessed). ``init``: a GeoSurge of the same architecture whose weights the
    student starts from (an earlier QAT's tuned weights; unchanged), else the teacher's. Returns (a plain GeoSurge
    with the tuned FP32 weights, the record for the manifest: settings, fake-quantized error before / after on the
    training images, seconds, how many quantized modules). Raises GeosurgeError when there are no images or
    ``init``'s tensors differ from the model's in names or shapes."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils import parametrize

    cfg = cfg or QATConfig()
    if len(images) < 1:
        raise GeosurgeError("QAT needs at least one unlabelled image")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    original = model
    teacher = copy.deepcopy(model).eval().to(device) if device.type != "cpu" else model.eval()
    x_all = _Images(images, device)
    with torch.no_grad():  # targets for each image and its mirror, computed once
        t_emb = {flip: torch.cat([teacher.embed(x_all[i:i + 32].flip(-1) if flip else x_all[i:i + 32])
                                  for i in range(0, len(x_all), 32)]) for flip in (False, True)}
    if init is not None:
        ours, theirs = model.state_dict(), init.state_dict()
        diff = sorted(set(ours) ^ set(theirs)) or [k for k in ours if ours[k].shape != theirs[k].shape]
        if diff:
            raise GeosurgeError(f"QAT: the starting checkpoint is not this model's architecture ({len(diff)} "
                                f"tensor(s) differ in name or shape, e.g. {diff[0]})")
    student = copy.deepcopy(init if init is not None else teacher).to(device).eval()
    if init is not None:  # the cell head stays the teacher's: the bundle's table is the exported model's
        student.head.load_state_dict(teacher.head.state_dict())
    for p in student.head.parameters():
        p.requires_grad_(False)
    acts = insert_fake_quant(student, cfg.weight_bits, cfg.exclude)
    ranges = observe_ranges(student, acts, x_all)  # min / max over the images, as onnxruntime's MinMax
    drifts = []
    quantizers = sum(1 for m in student.modules() if parametrize.is_parametrized(m, "weight"))
    outputs = sum(1 for a in acts if hasattr(a, "producer") and a.producer not in cfg.exclude)
    params = [p for n, p in student.named_parameters() if p.requires_grad and not n.startswith("head.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)

    def loss_of(xb, target):
        emb = student.embed(xb)
        cos = F.cosine_similarity(emb, target, dim=-1).mean()
        lp_s, lp_t = _level_log_probs(student, emb), _level_log_probs(teacher, target)
        kl = torch.stack([F.kl_div(s, t, log_target=True, reduction="batchmean") for s, t in zip(lp_s, lp_t)]).mean()
        loss = (1 - cos) + cfg.kl_weight * kl
        if cfg.rank_weight:
            loss = loss + cfg.rank_weight * rank_loss(student.head, lp_s, lp_t, cfg.rank_top)
        return loss, 1 - cos.detach()

    def evaluate() -> float:
        with torch.no_grad():
            return float(np.mean([loss_of(x_all[i:i + 16], t_emb[False][i:i + 16])[1].item()
                                  for i in range(0, len(x_all), 16)]))

    before = evaluate()
    log(f"QAT: {quantizers} Conv / Linear fake-quantized (weights {cfg.weight_bits}-bit per channel, inputs uint8 "
        f"per tensor, {outputs} BatchNorm outputs uint8" + (f"; {len(cfg.exclude)} kept float" if cfg.exclude else "")
        + f"); {cfg.steps} steps x {cfg.batch} images of {len(x_all)} on {device}"
        + (f"; loss + {cfg.rank_weight:g} x ranking of the top-{cfg.rank_top} finest cells" if cfg.rank_weight else "")
        + f"; 1 - cos to FP32 before {before:.2e}")
    losses = []
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.choice(len(x_all), size=min(cfg.batch, len(x_all)), replace=False)).to(device)
        flip = bool(rng.random() < 0.5)
        xb = x_all[idx].flip(-1) if flip else x_all[idx]
        loss, _ = loss_of(xb, t_emb[flip][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        if (step + 1) % max(1, cfg.steps // 5) == 0 or step + 1 == cfg.steps:
            log(f"  QAT step {step + 1}/{cfg.steps}: loss {np.mean(losses[-20:]):.2e} "
                f"({time.perf_counter() - t0:.0f}s)")
        if cfg.range_every and ((step + 1) % cfg.range_every == 0 or step + 1 == cfg.steps):
            new = observe_ranges(student, acts, x_all)  # what the export's calibration of these weights gives
            drifts.append(range_drift(ranges, new))
            ranges = new
            log(f"  QAT step {step + 1}: activation ranges observed again on the tuned weights (largest span "
                f"change {drifts[-1]:.1%})")
    after = evaluate()  # with the ranges the export will calibrate (after the last refresh)
    log(f"QAT: 1 - cos to FP32 (fake-quantized, on its training images) {before:.2e} -> {after:.2e}")
    for mod in student.modules():  # the plain (unquantized) weights back in place
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    tuned = copy.deepcopy(original)
    state = {k: v.detach().cpu() for k, v in student.state_dict().items() if k in tuned.state_dict()}
    missing = set(tuned.state_dict()) - set(state)
    if missing:
        raise GeosurgeError(f"QAT: the tuned model lost {len(missing)} tensor(s) (e.g. {sorted(missing)[0]})")
    tuned.load_state_dict(state)
    record = {"method": "quantization-aware distillation (torch.ao fake quantization in onnxruntime's scheme: "
                        "uint8 asymmetric per-tensor inputs, int8 per-channel weights; the FP32 model as teacher)",
              **asdict(cfg), "device": str(device), "images": int(len(x_all)), "quantized_modules": quantizers,
              "fake_quant_error_before": before, "fake_quant_error_after": after,
              "range_drift": [round(d, 4) for d in drifts],
              "seconds": round(time.perf_counter() - t0, 1),
              "exported_as": "the tuned FP32 weights, quantized by onnxruntime static QDQ"}
    return tuned.eval(), record
