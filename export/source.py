"""Which torch model a bundle came from: a checkpoint directory, or a named config built from a fixed seed
(recorded in the manifest's ``source``, so ``geosurge parity`` rebuilds exactly the same FP32 model)."""
from __future__ import annotations

from pathlib import Path

import torch

from geosurge.errors import GeosurgeError


def load_model(model: str | None = None, checkpoint: str | None = None, seed: int = 0, hierarchy=None):
    """Returns (model, source dict: ``checkpoint``, ``config``, ``seed``; the manifest's ``source`` section)."""
    from geosurge.models import GeoSurge, build_model

    if checkpoint:
        m = GeoSurge.from_pretrained(checkpoint)
        return m.eval(), {"checkpoint": str(Path(checkpoint).resolve()), "config": m.config.name, "seed": None}
    if not model:
        raise GeosurgeError("give --model NAME or --checkpoint DIR")
    torch.manual_seed(seed)
    m = build_model(model, hierarchy)
    return m.eval(), {"checkpoint": None, "config": model, "seed": seed}


def reference_checkpoint(bundle, checkpoint: str | None = None) -> str | None:
    """The checkpoint a bundle is measured against: ``checkpoint``, else the manifest's ``source.reference`` (a QAT
    checkpoint's teacher), else its ``source.checkpoint``; None for a model built from a config and seed."""
    src = bundle.manifest.source
    return checkpoint or src.reference or src.checkpoint


def reference_label(bundle, checkpoint: str | None = None) -> str:
    """What :func:`load_source_model` loads, for a record or a title: the checkpoint path, or "CONFIG, seed N"."""
    src = bundle.manifest.source
    return str(reference_checkpoint(bundle, checkpoint) or f"{src.config}, seed {src.seed}")


def load_source_model(bundle, checkpoint: str | None = None):
    """The FP32 torch model a bundle is measured against: the manifest's ``source.reference`` (a QAT checkpoint's
    teacher) or else its ``source.checkpoint`` / config; ``checkpoint`` overrides both."""
    from geosurge.geo import load_hierarchy

    src = bundle.manifest.source
    ck = reference_checkpoint(bundle, checkpoint)
    if ck:
        if not Path(ck).is_dir():
            what = "reference (the model its QAT checkpoint was distilled from)" if ck == src.reference else "source"
            raise GeosurgeError(f"{ck}: the bundle's {what} checkpoint is not here; pass --checkpoint DIR")
        model, _ = load_model(checkpoint=ck)
    elif src.seed is None:
        raise GeosurgeError(f"{bundle.root}: exported from an in-memory model (no checkpoint, no seed recorded); "
                            "pass --checkpoint DIR of that model")
    else:
        model, _ = load_model(model=src.config, seed=src.seed, hierarchy=load_hierarchy(bundle.path("cells")))
    if model.hierarchy.digest() != bundle.manifest.hierarchy.digest:
        raise GeosurgeError(f"{bundle.root}: the torch model's hierarchy differs from the bundle's "
                            "(a pruned bundle is compared through its own golden outputs: geosurge-run verify)")
    return model
