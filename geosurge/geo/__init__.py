"""Geography: S2 cell hierarchy and geodesic metrics. numpy only, shared by the toolkit and the runtime."""
from .hierarchy import (CellHierarchy, CellLevel, build_hierarchy, load_hierarchy, scaled_taus)
from .metrics import (ACCURACY_THRESHOLDS_KM, accuracy_within, geoscore, haversine_km, median_error_km, summarize,
                      summarize_errors, unit_vectors)

__all__ = [
    "CellHierarchy", "CellLevel", "build_hierarchy", "load_hierarchy", "scaled_taus", "build_default_hierarchy",
    "ACCURACY_THRESHOLDS_KM", "accuracy_within", "geoscore", "haversine_km", "median_error_km", "summarize",
    "summarize_errors", "unit_vectors",
]


def build_default_hierarchy(levels: int = 7, tau_max=None, tau_min=None, points_csv=None, max_s2_level=None):
    """The default hierarchy: real MP-16 photo density (100K sample from geoclip), paper taus scaled to it."""
    from .hierarchy import DEFAULT_MAX_S2_LEVEL
    from .points import default_points, read_points_csv

    if points_csv is not None:
        lat, lon = read_points_csv(points_csv)
        source = str(points_csv)
    else:
        lat, lon, source = default_points()
    d_tmax, d_tmin = scaled_taus(lat.size, levels)
    return build_hierarchy(lat, lon, tau_max or d_tmax, d_tmin if tau_min is None else tau_min,
                           max_s2_level or DEFAULT_MAX_S2_LEVEL, source=source)
