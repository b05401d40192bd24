"""Synthetic geo-tagged images for training tests: each location has its own colour and stripe pattern."""
import csv
from pathlib import Path

import cv2
import numpy as np

from geosurge.geo import build_hierarchy

LOCATIONS = [(48.85, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69), (-22.9, -43.2), (30.04, 31.24),
             (55.75, 37.62), (1.35, 103.82), (64.15, -21.94), (-1.29, 36.82), (19.43, -99.13), (28.61, 77.21)]


def make_image(loc: int, k: int, size: int = 80, rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(1000 * loc + k)
    hue = int(180 * loc / len(LOCATIONS))
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.pi * loc / len(LOCATIONS)
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / (2 + loc % 4)) > 0).astype(np.uint8)
    hsv = np.stack([np.full((size, size), hue, np.uint8), (120 + 100 * stripes).astype(np.uint8),
                    (90 + 120 * stripes).astype(np.uint8)], -1)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR).astype(np.int16)
    bgr += rng.integers(-20, 21, size=bgr.shape, dtype=np.int16)
    return np.clip(bgr, 0, 255).astype(np.uint8)


def make_manifest(root: Path, n_locations: int = 8, per_location: int = 6, size: int = 80, bad_files: int = 0):
    """Write images + manifest.csv under root; return (csv path, hierarchy over exactly these locations,
    per-row location index)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, locs = [], []
    for i in range(n_locations):
        lat, lon = LOCATIONS[i]
        for k in range(per_location):
            name = f"img_{i:02d}_{k:02d}.png"
            cv2.imwrite(str(root / name), make_image(i, k, size))
            rows.append((name, lat, lon))
            locs.append(i)
    for b in range(bad_files):
        name = f"broken_{b}.jpg"
        (root / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append((name, LOCATIONS[0][0], LOCATIONS[0][1]))
        locs.append(0)
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "lat", "lon"])
        w.writerows(rows)
    pts = np.array([LOCATIONS[i] for i in range(n_locations) for _ in range(per_location)])
    h = build_hierarchy(pts[:, 0], pts[:, 1], tau_max=[4 * per_location, per_location], tau_min=2, max_s2_level=12)
    return path, h, np.array(locs)
