"""User weights: local transformers folders and third-party state dicts, read strictly, never downloaded.

A transformers folder is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``, or a
``pytorch_model.bin`` that transformers reads with ``torch.load(weights_only=True)``), optionally with the
``preprocessor_config.json`` of its image processor. Its ``config.json`` decides the architecture (see
:func:`read_folder_config`); its weights must then fill every tensor of that architecture (:func:`load_folder_model`).
Anything that does not fit is one :class:`~geosurge.errors.GeosurgeError` naming the folder or file and the shapes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import GeosurgeError
from ..preprocess import INTERPOLATIONS

# PIL resample codes in transformers' image-processor configs -> our interpolation names (PIL: 2 BILINEAR,
# 3 BICUBIC, 4 BOX, which for downscaling is area averaging).
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic", 4: "area"}
# config keys that describe where a folder came from, not the architecture
_PROVENANCE_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")
MAX_LISTED = 5


def local_folder(path, what: str) -> Path:
    """``path`` as a local transformers folder (a directory holding ``config.json``), else a GeosurgeError."""
    path = Path(path)
    if not path.is_dir():
        raise GeosurgeError(f"{path}: {what} weights must be a local transformers folder (config.json + "
                            "model.safetensors); nothing is downloaded")
    if not (path / "config.json").is_file():
        raise GeosurgeError(f"{path}: no config.json; {what} weights must be a local transformers folder")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs its own load report; ours is the error we raise, so keep its log to errors only."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def read_folder_config(path, config_cls, what: str):
    """The folder's architecture: ``config_cls.from_pretrained`` on its ``config.json`` (a full ``CLIPModel``
    folder yields its vision config). Raises GeosurgeError when the file is unreadable or of another model type."""
    path = local_folder(path, what)
    f = path / "config.json"
    try:
        found = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GeosurgeError(f"{f}: unreadable ({e})") from None
    sub = getattr(config_cls, "base_config_key", None)  # a CLIPModel folder nests the vision config
    if not isinstance(found, dict) or found.get("model_type") != config_cls.model_type and not (
            sub and isinstance(found.get(sub), dict)):
        kind = found.get("model_type") if isinstance(found, dict) else None
        raise GeosurgeError(f"{f}: not a {what} config (model_type {kind!r}, expected {config_cls.model_type!r})")
    try:
        with _quiet_transformers():
            return config_cls.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers / huggingface_hub validation errors have no common base
        raise GeosurgeError(f"{f}: not a valid {what} config ({type(e).__name__}: {e})") from None


def config_record(hf_config) -> dict:
    """A transformers config as plain JSON (what a geosurge checkpoint records to rebuild the same architecture)."""
    d = json.loads(hf_config.to_json_string(use_diff=False))
    for k in _PROVENANCE_KEYS:
        d.pop(k, None)
    return d


def load_folder_model(model_cls, path, hf_config, what: str, **kwargs) -> nn.Module:
    """``model_cls.from_pretrained(path, config=hf_config)``, local only, ``weights_only=True``, and strict: a tensor
    of the architecture that the folder lacks (it would stay randomly initialised) or whose shape differs is a
    GeosurgeError listing the keys and shapes. Tensors the architecture does not use (a full CLIP folder's text
    tower) are ignored."""
    path = local_folder(path, what)
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(
                str(path), config=hf_config, local_files_only=True, weights_only=True, ignore_mismatched_sizes=True,
                output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise GeosurgeError(f"{path}: cannot load {what} weights ({type(e).__name__}: {e})") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        raise GeosurgeError(f"{path}: {len(mismatched)} {what} tensor(s) do not fit the folder's own config.json: "
                            + _list_shapes((k, tuple(a), tuple(b)) for k, a, b in mismatched))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise GeosurgeError(f"{path}: {len(missing)} {what} tensor(s) of the architecture in its config.json are not "
                            f"in its weights (they would stay random): {', '.join(missing[:MAX_LISTED])}"
                            + (" ..." if len(missing) > MAX_LISTED else ""))
    return model


def read_processor(path) -> dict:
    """What a folder's ``preprocessor_config.json`` (a transformers image processor) says about input preparation,
    in our terms: ``mean``/``std`` on the [0, 1] scale (processors written for 0..255 inputs are divided by 255),
    ``interpolation``, ``resize_size`` (shortest edge) and ``crop_size``. Missing file or keys: absent from the dict."""
    f = Path(path) / "preprocessor_config.json"
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"a JSON object expected, found {type(d).__name__}")
        return _processor_fields(d)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise GeosurgeError(f"{f}: unreadable image-processor config ({type(e).__name__}: {e})") from None


def _processor_fields(d: dict) -> dict:
    out: dict = {}
    mean, std = d.get("image_mean"), d.get("image_std")
    if all(isinstance(v, (list, tuple)) and len(v) == 3 for v in (mean, std)):
        # OneFormer/Mask2Former processors normalise 0..255 pixels (mean 123.675, ...); ours are on [0, 1]
        scale = 255.0 if max(float(x) for x in mean) > 1.0 else 1.0
        out["mean"] = tuple(float(x) / scale for x in mean)
        out["std"] = tuple(float(x) / scale for x in std)
    if d.get("resample") in _PIL_RESAMPLE and _PIL_RESAMPLE[d["resample"]] in INTERPOLATIONS:
        out["interpolation"] = _PIL_RESAMPLE[d["resample"]]
    size, crop = d.get("size"), d.get("crop_size")
    if isinstance(size, dict) and "shortest_edge" in size:
        out["resize_size"] = int(size["shortest_edge"])
    elif isinstance(size, int):
        out["resize_size"] = size
    if d.get("do_center_crop", crop is not None) and crop is not None:
        out["crop_size"] = int(crop["height"]) if isinstance(crop, dict) else int(crop)
    return out


def processor_spec(spec, size: int, folder):
    """``spec`` (a :class:`~geosurge.preprocess.PreprocessSpec`) for a backbone whose weights fix its input at
    ``size`` x ``size``: the crop becomes ``size``; the resize keeps the folder processor's ratio of resize to
    crop (CLIP: shortest edge 336, crop 336) or else ``spec``'s own; mean, std and interpolation come from the
    folder's ``preprocessor_config.json`` where it has them."""
    from dataclasses import replace

    proc = read_processor(folder)
    kw: dict = {"size": size}
    if "resize_size" in proc and "crop_size" in proc:
        kw["resize"] = "shorter_side"
        kw["resize_size"] = max(size, round(proc["resize_size"] * size / proc["crop_size"]))
    elif spec.resize == "shorter_side":
        kw["resize_size"] = max(size, round(spec.resize_size * size / spec.size))
    kw.update({k: proc[k] for k in ("mean", "std", "interpolation") if k in proc})
    return replace(spec, **kw)


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], source, arch_source: str,
                       allow_unexpected: bool = False) -> None:
    """``module.load_state_dict(state)``, but every disagreement (a tensor of another shape, one missing, one
    unexpected) is one GeosurgeError naming ``source`` (the weight file) and ``arch_source`` (what decided the
    architecture), with the shapes, instead of torch's ``RuntimeError: size mismatch`` traceback."""
    own = module.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [] if allow_unexpected else [k for k in state if k not in own]
    if bad:
        raise GeosurgeError(f"{source}: {len(bad)} tensor(s) do not fit the architecture of {arch_source} "
                            f"(file vs model): " + _list_shapes(bad))
    if missing or unexpected:
        raise GeosurgeError(f"{source}: the weights do not fit the architecture of {arch_source} (missing "
                            f"{missing[:MAX_LISTED]}, unexpected {unexpected[:MAX_LISTED]})")
    module.load_state_dict(state, strict=not allow_unexpected)


def _list_shapes(rows) -> str:
    rows = list(rows)
    text = "; ".join(f"{k} {a} vs {b}" for k, a, b in rows[:MAX_LISTED])
    return text + (f"; ... {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else "")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A third-party weight file: safetensors, or a .pth read with ``weights_only=True`` (never a full unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise GeosurgeError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise GeosurgeError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise GeosurgeError(f"{path}: not a plain tensor state_dict ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GeosurgeError(f"{path}: expected a state_dict of tensors, found {type(sd).__name__}")
    return sd
