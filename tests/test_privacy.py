"""No telemetry: running a bundle writes nothing under the user's HOME (ONNX Runtime's device id and event queue,
OpenVINO's client id and stats), unless GEOSURGE_ALLOW_TELEMETRY=1 (geosurge/privacy.py)."""
import os
import subprocess
import sys

import pytest

from geosurge import api, privacy
from geosurge.samples import sample_photo_paths

from .conftest import run_cli

#: variables that would turn the libraries' telemetry off by themselves (ORT and openvino_telemetry skip CI jobs):
#: removed from the child's environment so the test sees what a user's shell gets
_OFF_BY_THEMSELVES = ("CI", "TF_BUILD", "JENKINS_URL", privacy.ORT_ENV, privacy.ALLOW_ENV, "ORT_RUNNING_UNIT_TESTS")


def _user_env(home, **extra):
    env = {k: v for k, v in os.environ.items() if k not in _OFF_BY_THEMSELVES}
    return dict(env, HOME=str(home), **extra)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy") / "tiny"
    api.export("tiny", out, golden=sample_photo_paths()[:1], log=lambda m: None)
    return out


def _backends():
    out = ["onnxruntime"]
    try:
        import openvino  # noqa: F401
        out.append("openvino")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", _backends())
def test_locate_writes_nothing_under_an_empty_home(bundle, tmp_path, backend):
    home = tmp_path / "home"
    home.mkdir()
    exe = os.path.join(os.path.dirname(sys.executable), "geosurge-run")
    r = subprocess.run([exe, "locate", str(bundle), str(sample_photo_paths()[0]), "--backend", backend],
                       capture_output=True, text=True, env=_user_env(home), timeout=300)
    assert r.returncode == 0, r.stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"{backend}: files written under HOME: {written}"


def test_allowing_telemetry_leaves_the_libraries_defaults(tmp_path):
    code = ("import os, sys, geosurge; print(os.environ.get('ORT_DISABLE_TELEMETRY'), "
            "'openvino_telemetry' in sys.modules and sys.modules['openvino_telemetry'] is None)")
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_user_env(tmp_path))
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=_user_env(tmp_path, GEOSURGE_ALLOW_TELEMETRY="1"))
    assert off.stdout.split() == ["1", "True"], off.stderr
    assert on.stdout.split() == ["None", "False"], on.stderr


def test_opt_out_is_idempotent_and_respects_allow(monkeypatch):
    monkeypatch.delenv(privacy.ORT_ENV, raising=False)
    monkeypatch.delitem(sys.modules, privacy.OPENVINO_TELEMETRY_MODULE, raising=False)
    monkeypatch.setenv(privacy.ALLOW_ENV, "yes")
    assert privacy.opt_out() is False and privacy.ORT_ENV not in os.environ
    assert privacy.OPENVINO_TELEMETRY_MODULE not in sys.modules
    monkeypatch.setenv(privacy.ALLOW_ENV, "0")
    assert privacy.opt_out() is True and privacy.opt_out() is True
    assert os.environ[privacy.ORT_ENV] == "1" and sys.modules[privacy.OPENVINO_TELEMETRY_MODULE] is None
    with pytest.raises(ImportError):
        import openvino_telemetry  # noqa: F401


def test_geosurge_run_help_names_the_opt_in(tmp_path):
    r = run_cli("geosurge-run", "--help")
    assert r.returncode == 0 and privacy.ALLOW_ENV in r.stdout
