import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_hierarchy():
    from geosurge.geo import build_default_hierarchy

    return build_default_hierarchy()


@pytest.fixture(scope="session")
def default_points():
    from geosurge.geo.points import default_points

    lat, lon, _ = default_points()
    return lat, lon


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run a console entry point in a subprocess (as a user would) and return the CompletedProcess."""
    exe = Path(sys.executable).parent / args[0]
    cmd = [str(exe), *map(str, args[1:])]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout)


def random_sphere_points(n, seed=0):
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    return lat, lon
