"""Vectorised S2 cell ids in numpy (no torch, no per-point Python loop).

The S2 geometry (faces, quadratic UV->ST projection, Hilbert curve order) follows Google's S2 library; the ids are
checked against s2sphere / s2cell in the tests. Cell ids are ``uint64`` throughout (faces 4 and 5 overflow int64).
"""
from __future__ import annotations

import numpy as np

MAX_LEVEL = 30
POS_BITS = 2 * MAX_LEVEL + 1
MAX_SIZE = 1 << MAX_LEVEL
LOOKUP_BITS = 4
SWAP_MASK = 0x01
INVERT_MASK = 0x02
EARTH_RADIUS_KM = 6371.0088

_U64 = np.uint64


def _build_lookup() -> tuple[np.ndarray, np.ndarray]:
    pos_to_ij = ((0, 1, 3, 2), (0, 2, 3, 1), (3, 2, 0, 1), (3, 1, 0, 2))
    pos_to_orientation = (SWAP_MASK, 0, 0, INVERT_MASK | SWAP_MASK)
    size = 1 << (2 * LOOKUP_BITS + 2)
    lookup_pos = np.zeros(size, dtype=np.int64)
    lookup_ij = np.zeros(size, dtype=np.int64)
    # iterative depth-first walk of the Hilbert curve down LOOKUP_BITS levels, for each start orientation
    for orig in range(4):
        stack = [(0, 0, 0, 0, orig)]
        while stack:
            level, i, j, pos, orientation = stack.pop()
            if level == LOOKUP_BITS:
                ij = (i << LOOKUP_BITS) + j
                lookup_pos[(ij << 2) + orig] = (pos << 2) + orientation
                lookup_ij[(pos << 2) + orig] = (ij << 2) + orientation
                continue
            r = pos_to_ij[orientation]
            for index in range(4):
                stack.append((level + 1, (i << 1) + (r[index] >> 1), (j << 1) + (r[index] & 1),
                              (pos << 2) + index, orientation ^ pos_to_orientation[index]))
    return lookup_pos, lookup_ij


LOOKUP_POS, LOOKUP_IJ = _build_lookup()


def latlng_to_xyz(lat_deg, lon_deg) -> np.ndarray:
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    c = np.cos(lat)
    return np.stack([c * np.cos(lon), c * np.sin(lon), np.sin(lat)], axis=-1)


def xyz_to_latlng(xyz) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lat = np.degrees(np.arctan2(z, np.hypot(x, y)))
    lon = np.degrees(np.arctan2(y, x))
    return lat, lon


def _xyz_to_face_uv(p: np.ndarray):
    ax = np.abs(p)
    face = np.argmax(ax, axis=-1)
    comp = np.take_along_axis(p, face[..., None], axis=-1)[..., 0]
    face = np.where(comp < 0, face + 3, face)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.select([face == 0, face == 1, face == 2, face == 3, face == 4, face == 5],
                      [y / x, -x / y, -x / z, z / x, z / y, -y / z])
        v = np.select([face == 0, face == 1, face == 2, face == 3, face == 4, face == 5],
                      [z / x, z / y, -y / z, y / x, -x / y, -x / z])
    return face.astype(np.int64), u, v


def _uv_to_st(u):
    return np.where(u >= 0, 0.5 * np.sqrt(np.maximum(1 + 3 * u, 0)), 1 - 0.5 * np.sqrt(np.maximum(1 - 3 * u, 0)))


def _st_to_uv(s):
    return np.where(s >= 0.5, (1.0 / 3.0) * (4 * s * s - 1), (1.0 / 3.0) * (1 - 4 * (1 - s) * (1 - s)))


def _face_uv_to_xyz(face, u, v) -> np.ndarray:
    one = np.ones_like(u)
    x = np.select([face == 0, face == 1, face == 2, face == 3, face == 4, face == 5], [one, -u, -u, -one, v, v])
    y = np.select([face == 0, face == 1, face == 2, face == 3, face == 4, face == 5], [u, one, -v, -v, -one, u])
    z = np.select([face == 0, face == 1, face == 2, face == 3, face == 4, face == 5], [v, v, one, -u, -u, -one])
    return np.stack([x, y, z], axis=-1)


def _face_ij_to_id(face, i, j) -> np.ndarray:
    face = face.astype(np.int64)
    n = face.astype(_U64) << _U64(POS_BITS - 1)
    bits = face & SWAP_MASK
    mask = (1 << LOOKUP_BITS) - 1
    for k in range(7, -1, -1):
        bits = bits + (((i >> (k * LOOKUP_BITS)) & mask) << (LOOKUP_BITS + 2))
        bits = bits + (((j >> (k * LOOKUP_BITS)) & mask) << 2)
        bits = LOOKUP_POS[bits]
        n = n | ((bits >> 2).astype(_U64) << _U64(k * 2 * LOOKUP_BITS))
        bits = bits & (SWAP_MASK | INVERT_MASK)
    return n * _U64(2) + _U64(1)


def _id_to_face_ij(ids: np.ndarray):
    ids = np.asarray(ids, dtype=_U64)
    face = (ids >> _U64(POS_BITS)).astype(np.int64)
    bits = face & SWAP_MASK
    i = np.zeros(ids.shape, dtype=np.int64)
    j = np.zeros(ids.shape, dtype=np.int64)
    for k in range(7, -1, -1):
        nbits = MAX_LEVEL - 7 * LOOKUP_BITS if k == 7 else LOOKUP_BITS
        chunk = (ids >> _U64(k * 2 * LOOKUP_BITS + 1)) & _U64((1 << (2 * nbits)) - 1)
        bits = bits + (chunk.astype(np.int64) << 2)
        bits = LOOKUP_IJ[bits]
        i = i + ((bits >> (LOOKUP_BITS + 2)) << (k * LOOKUP_BITS))
        j = j + (((bits >> 2) & ((1 << LOOKUP_BITS) - 1)) << (k * LOOKUP_BITS))
        bits = bits & (SWAP_MASK | INVERT_MASK)
    return face, i, j


def latlng_to_leaf(lat_deg, lon_deg) -> np.ndarray:
    """Leaf (level-30) S2 cell ids of points, as uint64."""
    face, u, v = _xyz_to_face_uv(latlng_to_xyz(lat_deg, lon_deg))
    i = np.clip(np.floor(MAX_SIZE * _uv_to_st(u)), 0, MAX_SIZE - 1).astype(np.int64)
    j = np.clip(np.floor(MAX_SIZE * _uv_to_st(v)), 0, MAX_SIZE - 1).astype(np.int64)
    return _face_ij_to_id(face, i, j)


def lsb_for_level(level) -> np.ndarray:
    return _U64(1) << (_U64(2) * (_U64(MAX_LEVEL) - np.asarray(level, dtype=_U64)))


def lsb(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=_U64)
    return ids & (~ids + _U64(1))


def level_of(ids) -> np.ndarray:
    """S2 level (0..30) of each cell id."""
    low = lsb(ids).astype(np.float64)  # exact: a power of two below 2**61
    return (MAX_LEVEL - np.log2(low).astype(np.int64) // 2).astype(np.int64)


def parent(ids, level) -> np.ndarray:
    """Ancestor of each cell at S2 ``level`` (must not be finer than the cell's own level)."""
    ids = np.asarray(ids, dtype=_U64)
    new = lsb_for_level(level)
    return (ids & (~new + _U64(1))) | new


def children(ids) -> np.ndarray:
    """The 4 children of each cell, shape (N, 4), in Hilbert order."""
    ids = np.asarray(ids, dtype=_U64)
    low = lsb(ids)
    begin = ids - low + (low >> _U64(2))
    step = low >> _U64(1)
    return begin[:, None] + step[:, None] * np.arange(4, dtype=_U64)[None, :]


def range_min(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=_U64)
    return ids - (lsb(ids) - _U64(1))


def range_max(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=_U64)
    return ids + (lsb(ids) - _U64(1))


def face_cells() -> np.ndarray:
    return (np.arange(6, dtype=_U64) << _U64(POS_BITS)) | (_U64(1) << _U64(POS_BITS - 1))


def to_token(ids) -> list[str]:
    out = []
    for v in np.asarray(ids, dtype=_U64).ravel().tolist():
        t = f"{v:016x}".rstrip("0")
        out.append(t or "X")
    return out


def from_token(tokens) -> np.ndarray:
    vals = [0 if t == "X" else int(t.ljust(16, "0"), 16) for t in tokens]
    return np.array(vals, dtype=_U64)


def _cell_ij_box(ids):
    """Face, lower (i, j) corner and width in leaf units of each cell."""
    ids = np.asarray(ids, dtype=_U64)
    face, i, j = _id_to_face_ij(ids)
    width = np.left_shift(1, MAX_LEVEL - level_of(ids))
    return face, i & ~(width - 1), j & ~(width - 1), width


def cell_vertices(ids) -> np.ndarray:
    """Unit vectors of each cell's 4 corners, shape (N, 4, 3), counter-clockwise."""
    ids = np.asarray(ids, dtype=_U64)
    face, i0, j0, size = _cell_ij_box(ids)
    corners = []
    for di, dj in ((0, 0), (1, 0), (1, 1), (0, 1)):
        s = (i0 + di * size) / MAX_SIZE
        t = (j0 + dj * size) / MAX_SIZE
        p = _face_uv_to_xyz(face, _st_to_uv(s), _st_to_uv(t))
        corners.append(p / np.linalg.norm(p, axis=-1, keepdims=True))
    return np.stack(corners, axis=-2)


def cell_boundary_latlng(ids, per_edge: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of ``4 * per_edge`` points along each cell's boundary, counter-clockwise, shape (N, 4 * per_edge).
    S2 cell edges are geodesics, straight lines in (u, v): the points are sampled linearly in (u, v) between the
    corners, so each lies exactly on the edge."""
    ids = np.asarray(ids, dtype=_U64)
    face, i0, j0, size = _cell_ij_box(ids)
    corners = [(0, 0), (1, 0), (1, 1), (0, 1)]
    uv = [(_st_to_uv((i0 + di * size) / MAX_SIZE), _st_to_uv((j0 + dj * size) / MAX_SIZE)) for di, dj in corners]
    pts = []
    for k in range(4):
        (ua, va), (ub, vb) = uv[k], uv[(k + 1) % 4]
        for f in np.arange(per_edge) / per_edge:
            pts.append(_face_uv_to_xyz(face, ua + (ub - ua) * f, va + (vb - va) * f))
    xyz = np.stack(pts, axis=-2)
    return xyz_to_latlng(xyz / np.linalg.norm(xyz, axis=-1, keepdims=True))


def cell_center(ids) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of each cell's centre in (s, t) space, as S2's cell centre."""
    face, i0, j0, width = _cell_ij_box(ids)
    s = (i0 + width / 2.0) / MAX_SIZE
    t = (j0 + width / 2.0) / MAX_SIZE
    return xyz_to_latlng(_face_uv_to_xyz(face, _st_to_uv(s), _st_to_uv(t)))


def _triangle_area(a, b, c):
    num = np.abs(np.einsum("...i,...i->...", a, np.cross(b, c)))
    den = 1 + np.einsum("...i,...i->...", a, b) + np.einsum("...i,...i->...", b, c) + np.einsum("...i,...i->...", c, a)
    return 2 * np.arctan2(num, den)


def cell_area_km2(ids) -> np.ndarray:
    """Exact area of each cell on the sphere of mean Earth radius, in km^2."""
    v = cell_vertices(ids)
    sr = _triangle_area(v[:, 0], v[:, 1], v[:, 2]) + _triangle_area(v[:, 0], v[:, 2], v[:, 3])
    return sr * EARTH_RADIUS_KM ** 2
