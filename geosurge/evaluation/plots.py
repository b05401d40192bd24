"""The two PNGs of ``geosurge eval`` (matplotlib, Agg backend): the cumulative error distribution of every model, and
a world map of true vs predicted positions over Natural Earth country outlines (``geosurge.geo.regions``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geo import ACCURACY_THRESHOLDS_KM


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render to PNG bytes, then one atomic write (``geosurge.fsutil.atomic_write_bytes``)."""
    import io

    from ..fsutil import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_error_cdf(results, path) -> Path:
    """% of images within d km against d (log scale), one line per model (and per source when there are several
    sources: dashed for all but the first)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    grid = np.logspace(0, np.log10(20040), 400)
    styles = ["-", "--", ":", "-."]
    for i, res in enumerate(results):
        color = f"C{i % 10}"
        srcs = res.sources() or ["all"]
        for j, s in enumerate(srcs if len(srcs) > 1 else ["all"]):
            d = np.sort(res.errors(s))
            if d.size == 0:
                continue
            frac = 100.0 * np.searchsorted(d, grid, side="right") / d.size
            label = res.model["label"] + (f" — {s}" if len(srcs) > 1 else "") + f" (n={d.size})"
            ax.plot(grid, frac, styles[j % len(styles)], color=color, label=label)
    for t in ACCURACY_THRESHOLDS_KM:
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
        ax.text(t, 101, f"{t:g} km", ha="center", va="bottom", fontsize=8, color="0.4")
    ax.set_xscale("log")
    ax.set_xlim(1, 20040)
    ax.set_ylim(0, 100)
    ax.set_xlabel("great-circle error (km)")
    ax.set_ylabel("% of images within the error")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _outlines(ax):
    try:
        import shapely

        from ..geo.regions import country_outlines

        geoms = country_outlines()
    except Exception:  # noqa: BLE001 - the map is still useful without outlines (pyogrio/shapely missing)
        return False
    for g in geoms:
        for poly in shapely.get_parts(g):
            x, y = np.asarray(poly.exterior.coords).T
            ax.plot(x, y, color="0.65", lw=0.4, zorder=1)
    return True


def plot_world_map(results, path, max_points: int = 2000) -> Path:
    """One panel per model (up to 4): true positions (green), predictions (red) and a line joining each pair
    (drawn the short way round; a pair across the antimeridian is split at the map edge)."""
    plt = _plt()
    results = list(results)[:4]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 5.6 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        ax.set_facecolor("#eef4fa")
        _outlines(ax)
        preds = res.predictions
        if len(preds) > max_points:
            preds = [preds[i] for i in np.linspace(0, len(preds) - 1, max_points).astype(int)]
        for p in preds:
            x0, y0, x1, y1 = p["lon"], p["lat"], p["pred_lon"], p["pred_lat"]
            if abs(x1 - x0) <= 180:
                ax.plot([x0, x1], [y0, y1], color="0.35", lw=0.4, alpha=0.5, zorder=2)
            else:  # the short way crosses the antimeridian: two segments to the map edges
                x1u = x1 - 360 if x1 > x0 else x1 + 360
                for xa, xb in ((x0, x1u), (x1, x0 - 360 if x0 > x1 else x0 + 360)):
                    ax.plot([xa, xb], [y0 if xa == x0 else y1, y1 if xa == x0 else y0], color="0.35", lw=0.4,
                            alpha=0.5, zorder=2)
        if preds:
            ax.scatter([p["lon"] for p in preds], [p["lat"] for p in preds], s=7, c="#1a9641", label="true",
                       zorder=3)
            ax.scatter([p["pred_lon"] for p in preds], [p["pred_lat"] for p in preds], s=7, c="#d7191c",
                       marker="x", label="predicted", zorder=4)
        s = res.summary()["all"]
        ax.set_title(f"{res.model['label']}: n={s['n']}, median {s['median_km']:,.0f} km, "
                     f"acc@750km {s['acc@750km']:.1f}%", fontsize=10)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-90, 90)
        ax.set_aspect("equal")
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.legend(loc="lower left", fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
