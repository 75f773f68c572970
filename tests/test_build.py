"""The build compiles against the torch that imports it, or stops with the command to use."""

import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_isolated_build_without_torch_stops_with_the_command():
    # what pip's isolated build environment looks like to setup.py: no torch importable
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "__file__ = 'setup.py'; exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "pip install --no-build-isolation -e ." in res.stderr
    assert "would build against a different torch" in res.stderr


def test_build_requirements_do_not_fetch_a_torch():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11+ (the check reads pyproject.toml)")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    assert not [r for r in requires if r.replace(" ", "").lower().startswith("torch")], requires
