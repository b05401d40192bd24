"""Georeferenced imagery for training and evaluating a reference model: rasters (a global equirectangular image or a
CRS-aware GeoTIFF), downward views rendered from them, view centres drawn from the photo density the default
hierarchy is built from, and the geographic held-out split. numpy + OpenCV (+ rasterio/pyproj for GeoTIFFs); no
torch."""
from .rasters import SOURCES, EquirectRaster, GeoRaster, GeoTiffRaster, load_raster, source_names
from .views import (ViewSpec, draw_centres, draw_view_specs, heldout_split, render_view, render_views, view_lonlat,
                    write_view_manifest)

__all__ = ["SOURCES", "EquirectRaster", "GeoRaster", "GeoTiffRaster", "load_raster", "source_names", "ViewSpec",
           "draw_centres", "draw_view_specs", "heldout_split", "render_view", "render_views", "view_lonlat",
           "write_view_manifest"]
