"""The CI gate turns every kind of skip into a failure, and leaves a local run's skips alone."""

import os
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest
pytest.importorskip("{module}")

def test_runs():
    pass

@pytest.mark.skipif(True, reason="no reference here")
def test_marked():
    pass

def test_inline():
    pytest.skip("not available")
'''


def run(tmp_path, ci: str, module: str = "json") -> subprocess.CompletedProcess:
    (tmp_path / "test_it.py").write_text(SKIPPING.format(module=module))
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_gate", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_it.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_skips_fail_in_ci(tmp_path):
    out = run(tmp_path, "true")
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed, 1 error" in out.stdout, out.stdout  # a skipif mark fails in setup: an error
    assert "test_marked skipped in CI (CI=true), which counts as a failure: no reference here" in out.stdout
    missing = run(tmp_path, "true", module="no_such_module_here")
    assert missing.returncode != 0 and "skipped in CI" in missing.stdout, missing.stdout


def test_skips_stay_skips_outside_ci(tmp_path):
    out = run(tmp_path, "")
    assert out.returncode == 0 and "1 passed, 2 skipped" in out.stdout, out.stdout
