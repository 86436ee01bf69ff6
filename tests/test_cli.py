import subprocess
import sys

import pytest

from hrnet_fast.cli import main


def test_info_lists_every_preset(capsys):
    assert main(["info", "--size", "64x128"]) == 0
    out = capsys.readouterr().out
    for name in ("w18_small_v1", "w18_small_v2", "w18", "w48", "w64"):
        assert f"\n{name} " in out
    assert "9.64" in out and "65.86" in out  # w18 and w48 parameter counts


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "hrnet_fast", "info", "--size", "32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "w18_small_v2" in r.stdout


def test_bad_size_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--size", "12xq"])
    assert e.value.code == 2
    assert "HxW" in capsys.readouterr().err
