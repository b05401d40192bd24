"""Views from georeferenced rasters: geometry, antimeridian, heading, GeoTIFF (CRS-aware), held-out split, seeds."""
import numpy as np
import pytest

from geosurge.data import EquirectRaster, GeoTiffRaster, ViewSpec, load_raster, render_view, view_lonlat
from geosurge.data.rasters import LatLonBox
from geosurge.data.views import (destination, draw_centres, draw_view_specs, heldout_split, view_is_valid,
                                 write_view_manifest)
from geosurge.geo import haversine_km


def _gradient_raster(w=720, h=360):
    """R linear in longitude (0 at -180, 255 at +180), G linear in latitude (0 at -90, 255 at +90); B = 128."""
    lon = (np.arange(w) + 0.5) / w * 360.0 - 180.0
    lat = 90.0 - (np.arange(h) + 0.5) / h * 180.0
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.round((lon[None, :] + 180.0) / 360.0 * 255.0)
    img[..., 1] = np.round((lat[:, None] + 90.0) / 180.0 * 255.0)
    img[..., 2] = 128
    return EquirectRaster(img, name="gradient")


def test_view_lands_the_right_pixels():
    r = _gradient_raster()
    for lat, lon in ((10.0, 20.0), (-45.0, -100.0), (60.0, 150.0)):
        spec = ViewSpec(lat, lon, heading_deg=0.0, footprint_km=300.0, size=33)
        rgb, valid = render_view(r, spec)
        assert valid == 1.0
        vlon, vlat = view_lonlat(spec)
        # the centre pixel is the centre point (odd size: pixel 16 is centred on it)
        assert abs(vlat[16, 16] - lat) < 1e-9 and abs(vlon[16, 16] - lon) < 1e-9
        # every pixel carries the raster's value at its own (lat, lon): bilinear sampling of a linear ramp is exact
        # up to the 8-bit quantisation of the ramp (0.5 level each side)
        exp_r = (vlon + 180.0) / 360.0 * 255.0
        exp_g = (vlat + 90.0) / 180.0 * 255.0
        assert np.abs(rgb[..., 0] - exp_r).max() <= 1.0
        assert np.abs(rgb[..., 1] - exp_g).max() <= 1.0


def test_sphere_projection_matches_pyproj_geodesics():
    from pyproj import Geod

    from geosurge.data.views import offsets_to_lonlat, view_offsets_km

    spec = ViewSpec(70.0, 25.0, heading_deg=33.0, footprint_km=1200.0, size=64)
    lon, lat = offsets_to_lonlat(spec.lat, spec.lon, *view_offsets_km(spec))  # the exact per-pixel projection
    # each pixel lies at its planned distance from the centre (azimuthal *equidistant*), on the sphere ...
    g = Geod(a=6371008.8, b=6371008.8)
    _, _, dist = g.inv(np.full(lon.shape, spec.lon), np.full(lon.shape, spec.lat), lon, lat)
    r = (np.arange(64) + 0.5 - 32) * spec.px_km
    planned = np.hypot(*np.meshgrid(r, r))
    assert np.abs(dist / 1000.0 - planned).max() < 1e-6
    # ... and within 0.5% of the WGS84 geodesic version
    lon_w, lat_w = view_lonlat(spec, geodesic="wgs84")
    assert haversine_km(lat, lon, lat_w, lon_w).max() < 0.005 * spec.footprint_km


def test_interpolated_projection_matches_the_exact_one():
    from geosurge.data.views import offsets_to_lonlat, view_offsets_km

    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(60):
        spec = ViewSpec(float(rng.uniform(-89, 89)), float(rng.uniform(-180, 180)), float(rng.uniform(0, 360)),
                        float(rng.uniform(300, 3000)), 256)
        lon, lat = view_lonlat(spec)  # lattice + bilinear (or exact near a pole)
        e, n = view_offsets_km(spec)
        lon_x, lat_x = offsets_to_lonlat(spec.lat, spec.lon, e, n)  # every pixel exactly
        worst = max(worst, haversine_km(lat, lon, lat_x, lon_x).max() / spec.px_km)
    assert worst < 0.05  # pixels


def _disc_raster(lat0, lon0, radius_km, w=3600, h=1800):
    lon = (np.arange(w) + 0.5) / w * 360.0 - 180.0
    lat = 90.0 - (np.arange(h) + 0.5) / h * 180.0
    inside = haversine_km(lat[:, None], lon[None, :], lat0, lon0) <= radius_km
    img = np.zeros((h, w, 3), np.uint8)
    img[inside] = 255
    return EquirectRaster(img, name="disc")


def test_no_stretch_at_70_degrees_a_ground_circle_stays_a_circle():
    r = _disc_raster(70.0, 30.0, 300.0)
    spec = ViewSpec(70.0, 30.0, heading_deg=37.0, footprint_km=1000.0, size=200)
    rgb, _ = render_view(r, spec)
    mask = rgb[..., 0] > 127
    ys, xs = np.nonzero(mask)
    radius_px = 300.0 / spec.px_km  # 60 px
    # area of the disc: within 4% (pixelated 0.1-degree raster edge)
    assert abs(mask.sum() / (np.pi * radius_px ** 2) - 1) < 0.04
    # centred, and round: the covariance's two eigenvalues agree within 3% (an equirectangular crop would be
    # stretched 1/cos(70) = 2.9x east-west)
    assert abs(xs.mean() - 99.5) < 1 and abs(ys.mean() - 99.5) < 1
    ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
    assert ev.max() / ev.min() < 1.03
    assert abs(np.sqrt(ev.mean() * 4) / radius_px - 1) < 0.03  # a disc's variance is r^2 / 4


def test_antimeridian_wrap():
    w, h = 720, 360
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 0, 0)  # western hemisphere red
    img[:, w // 2:] = (0, 0, 200)  # eastern hemisphere blue
    r = EquirectRaster(img, name="halves")
    rgb, valid = render_view(r, ViewSpec(0.0, 180.0, heading_deg=0.0, footprint_km=800.0, size=40))
    assert valid == 1.0
    # west of the antimeridian (left half of the view) is the eastern hemisphere (lon 17x E), east of it the
    # western (lon 17x W); nothing black from sampling off the image edge
    assert (rgb[:, :19, 2] == 200).all() and (rgb[:, 21:, 0] == 200).all()
    assert rgb[..., :3].max(axis=-1).min() >= 100


def test_heading_rotates_the_view():
    r = _gradient_raster()
    base = ViewSpec(30.0, 40.0, heading_deg=0.0, footprint_km=400.0, size=32)
    north_up, _ = render_view(r, base)
    east_up, _ = render_view(r, ViewSpec(30.0, 40.0, 90.0, 400.0, 32))
    # heading 90: the image's up axis points east, so the north-up image turned counter-clockwise by 90 degrees;
    # the pixel centres coincide exactly, the values to bilinear rounding
    assert np.abs(east_up.astype(int) - np.rot90(north_up, 1).astype(int)).max() <= 1
    # north-up: green (latitude) falls down the rows, red (longitude) rises to the right
    assert north_up[0, 16, 1] > north_up[-1, 16, 1] and north_up[16, -1, 0] > north_up[16, 0, 0]


def test_geotiff_in_a_projected_crs(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from pyproj import Transformer
    from rasterio.transform import from_bounds

    # Web Mercator GeoTIFF over lon 0..10, lat 40..50, R = lon ramp, G = lat ramp (computed per pixel centre)
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0 = to_merc.transform(0.0, 40.0)
    x1, y1 = to_merc.transform(10.0, 50.0)
    w = h = 400
    tf = from_bounds(x0, y0, x1, y1, w, h)
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = tf.c + tf.a * cols + tf.b * rows, tf.f + tf.d * cols + tf.e * rows
    lon, lat = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(xs, ys)
    data = np.stack([np.round(lon / 10.0 * 255), np.round((lat - 40.0) / 10.0 * 255), np.full(lon.shape, 128)])
    path = tmp_path / "merc.tif"
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=tf) as ds:
        ds.write(data.astype(np.uint8))
    r = load_raster(path)
    assert isinstance(r, GeoTiffRaster) and not r.is_global
    assert r.bounds[0] == pytest.approx(0.0, abs=1e-6) and r.bounds[3] == pytest.approx(50.0, abs=1e-6)
    spec = ViewSpec(45.0, 5.0, heading_deg=20.0, footprint_km=300.0, size=32)
    rgb, valid = render_view(r, spec)
    assert valid == 1.0
    vlon, vlat = view_lonlat(spec)
    # 1 level of ramp quantisation + up to 1 level of curvature of the lat ramp across a 2.8 km Mercator pixel
    assert np.abs(rgb[..., 0] - vlon / 10.0 * 255).max() <= 2.0
    assert np.abs(rgb[..., 1] - (vlat - 40.0) / 10.0 * 255).max() <= 2.0
    # a view hanging over the raster's edge: the part outside is reported invalid
    _, part = render_view(r, ViewSpec(45.0, 10.0, 0.0, 300.0, 32))
    assert 0.3 < part < 0.7
    assert not view_is_valid(r, ViewSpec(45.0, 10.0, 0.0, 300.0, 32))
    r.close()


def test_known_artefact_is_avoided():
    img = np.full((180, 360, 3), 90, np.uint8)
    r = EquirectRaster(img, exclude=(LatLonBox(-68.0, -60.0, -70.0, 90.0, "artefact"),))
    assert not view_is_valid(r, ViewSpec(-64.0, 0.0, 0.0, 500.0, 64))
    assert not view_is_valid(r, ViewSpec(-56.0, 0.0, 0.0, 1000.0, 64))  # only its edge reaches the box
    assert view_is_valid(r, ViewSpec(-64.0, 120.0, 0.0, 500.0, 64))
    pts = (np.array([-64.0, -64.0, 10.0]), np.array([0.0, 120.0, 10.0]))
    lat, lon = draw_centres(50, np.random.default_rng(0), raster=r, jitter_km=10.0, points=pts)
    assert not r.exclude[0].contains(lat, lon).any()


def test_heldout_split_distance_rule():
    rng = np.random.default_rng(3)
    tl, tn = rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)
    cl, cn = rng.uniform(-60, 60, 2000), rng.uniform(-180, 180, 2000)
    keep, d = heldout_split(tl, tn, cl, cn, 400.0)
    brute = haversine_km(cl[:, None], cn[:, None], tl[None, :], tn[None, :]).min(axis=1)
    np.testing.assert_allclose(d, brute, rtol=1e-9, atol=1e-6)
    assert keep.any() and (~keep).any()
    assert (brute[keep] >= 400.0).all() and (brute[~keep] < 400.0).all()


def test_draws_are_deterministic_by_seed(default_points):
    from geosurge.geo import build_hierarchy

    r = _gradient_raster()
    pts = (default_points[0][:3000], default_points[1][:3000])  # a slice of the real photo density
    h = build_hierarchy(*pts, tau_max=[300, 60], tau_min=2)

    def draw(seed):
        rng = np.random.default_rng(seed)
        lat, lon = draw_centres(40, rng, h, r, points=pts)
        return lat, lon, draw_view_specs(lat, lon, rng, (600.0, 1600.0), 64, r)

    a, b, c = draw(7), draw(7), draw(8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert (h.locate(a[0], a[1]) >= 0).all()  # every centre has a cell at every level
    assert all(600.0 <= s.footprint_km <= 1600.0 for s in a[2])
    assert np.array_equal(render_view(r, a[2][0])[0], render_view(r, b[2][0])[0])


def test_jitter_stays_within_radius():
    lat, lon = destination(np.full(500, 50.0), np.full(500, 8.0), np.linspace(0, 360, 500), np.full(500, 25.0))
    np.testing.assert_allclose(haversine_km(50.0, 8.0, lat, lon), 25.0, rtol=1e-9)


def test_view_manifest_roundtrip(tmp_path):
    from geosurge.evaluation import read_items

    r = _gradient_raster()
    specs = [ViewSpec(10.0, 20.0, 0.0, 500.0, 32), ViewSpec(-30.0, 140.0, 45.0, 900.0, 32)]
    imgs = np.stack([render_view(r, s)[0] for s in specs])
    path = write_view_manifest(tmp_path / "views", [("a", specs, imgs), ("b", specs, imgs)], fmt="png")
    items, fmt = read_items(path)
    assert fmt == "geosurge" and [i.source for i in items] == ["a", "a", "b", "b"]
    assert items[1].lat == pytest.approx(-30.0) and items[1].path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views"]  # no temp folder left


def test_blue_marble_is_real_imagery():
    r = load_raster("bmng")
    sahara, _ = render_view(r, ViewSpec(23.0, 12.0, 0.0, 800.0, 64))
    amazon, _ = render_view(r, ViewSpec(-4.0, -62.0, 0.0, 800.0, 64))
    ocean, _ = render_view(r, ViewSpec(-30.0, -140.0, 0.0, 800.0, 64))
    s, a, o = (im.reshape(-1, 3).mean(0) for im in (sahara, amazon, ocean))
    assert s[0] > s[2] + 40 and s.sum() > a.sum() + 100  # bright sand
    assert a[1] > a[2]  # green forest
    assert o[2] > o[0] + 20  # blue ocean


def test_views_command_writes_a_manifest(tmp_path, capsys):
    from geosurge.cli import main
    from geosurge.evaluation import read_items

    out = tmp_path / "v"
    assert main(["views", "-o", str(out), "-n", "3", "--source", "bmng", "--size", "64", "--seed", "2"]) == 0
    items, fmt = read_items(out / "manifest.csv")
    assert fmt == "geosurge" and len(items) == 3 and all(i.path.is_file() for i in items)
    assert main(["views", "-o", str(tmp_path / "w"), "--source", "no-such-raster"]) == 2
    assert "neither a raster file nor a named source" in capsys.readouterr().err
