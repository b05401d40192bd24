"""The bundle's golden probes: real photos, preprocessed, with the FP32 torch embeddings the exporter computed
(``golden.npz``). ``verify`` replays them on the device; ``bench`` re-encodes them as JPEG to time decoding too."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geosurge.errors import GeosurgeError


@dataclass
class Golden:
    inputs: np.ndarray  # (N, 3, S, S) float32, preprocessed per the manifest
    embedding: np.ndarray  # (N, D) float32, FP32 torch reference
    names: list[str]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, inputs=np.asarray(self.inputs, np.float32),
                            embedding=np.asarray(self.embedding, np.float32),
                            names=np.asarray(self.names, dtype=str))

    @classmethod
    def load(cls, path: Path) -> "Golden":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["inputs"], z["embedding"], [str(s) for s in z["names"]])
        except (OSError, KeyError, ValueError) as e:
            raise GeosurgeError(f"{path}: not a geosurge golden file ({e})") from None

    def jpegs(self, spec, quality: int = 92) -> list[bytes]:
        """The probes de-normalised (``spec``: the bundle's PreprocessSpec) and JPEG-encoded, so a benchmark's
        decode stage has real work."""
        import cv2

        out = []
        for x in self.inputs:
            rgb = x.transpose(1, 2, 0) * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
            rgb = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
            if spec.channel_order == "BGR":
                rgb = rgb[..., ::-1]
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
            out.append(buf.tobytes())
        return out
