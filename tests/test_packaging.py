"""The wheel `pip install .` builds (what the Dockerfile installs on every node of a cluster) holds every
module of clf/, and they import from it alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of what the Dockerfile copies, as a fresh checkout has it: in the checkout itself, the
    # editable install's clf.egg-info lists every file and would hide a package left out of the wheel.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "clf", source / "clf", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("clf-*.whl")
    return found


def test_the_wheel_holds_every_module_of_the_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("clf/")}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "clf").rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert sources and packed == sources


def test_the_jobs_modules_import_from_the_wheel_alone(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # Run outside the checkout, with the unpacked wheel first on the path: clf comes from there.
    code = ("import clf, clf.pipeline, clf.catalog, clf.tagging.pipeline; "
            "print(clf.__file__); print(clf.tagging.pipeline.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(line.startswith(str(tmp_path / "site")) for line in proc.stdout.split())
