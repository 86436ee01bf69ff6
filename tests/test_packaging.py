"""An installed wheel carries the kernel sources (hrnet_fast/_csrc), so it can JIT-build the CPU
fuse kernel and the CUDA extension at first use as a source checkout does."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hrnet_fast import cuda_ext

REPO = Path(__file__).resolve().parent.parent


def _setup_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hrnet_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


def test_every_kernel_source_is_shipped():
    pytest.importorskip("setuptools", reason="setup.py needs setuptools: packaging NOT tested")
    on_disk = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h"))
    assert sorted(_setup_module().KERNEL_SOURCES) == on_disk
    manifest = (REPO / "MANIFEST.in").read_text()
    assert "recursive-include csrc *.cpp *.cu *.h" in manifest


def test_wheel_contains_the_kernel_sources(tmp_path):
    pytest.importorskip("setuptools", reason="building a wheel needs setuptools: packaging NOT tested")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    for folder in ("csrc", "hrnet_fast"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, HRNET_FAST_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(src), "-w", str(tmp_path / "dist")], check=True, env=env, timeout=300)
    wheel, = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("hrnet_fast/_csrc/"))
    assert shipped == sorted(_setup_module().KERNEL_SOURCES)


def test_csrc_dir_falls_back_to_the_packaged_copy(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "hrnet_fast"
    (package / "_csrc").mkdir(parents=True)
    monkeypatch.setattr(cuda_ext, "__file__", str(package / "cuda_ext.py"))
    assert cuda_ext.csrc_dir() == package / "_csrc"  # installed: no csrc/ beside the package
    (tmp_path / "site-packages" / "csrc").mkdir()
    assert cuda_ext.csrc_dir() == tmp_path / "site-packages" / "csrc"  # a source checkout
