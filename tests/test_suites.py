"""The suites that need a process of their own, run from the CPU suite.

Numba picks the CUDA simulator when it is imported, and SyncBatchNorm's
tests need several MPI processes: so ``python -m pytest`` starts the GPU
suite under ``NUMBA_ENABLE_CUDASIM=1`` and the MPI suite under ``mpiexec``
on 2 and 3 ranks (its GPU cases simulated too), and names each test that
failed there.
"""
import os
import re
import shutil
import subprocess
import sys

import numba
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    bool(numba.config.ENABLE_CUDASIM),
    reason="starts the simulator suites itself (this process already simulates)")


def run_suite(command):
    """Run a pytest command in a fresh process; fail naming what failed there."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1800)
    output = result.stdout + result.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output,
                                   re.MULTILINE)))
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[-4:])} exited {result.returncode}; "
                    f"failed: {failed or 'see below'}\n{output[-6000:]}",
                    pytrace=False)
    summaries = re.findall(r"\b(\d+) passed", output)
    assert summaries, output[-2000:]  # it ran tests


PYTEST = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]


def test_gpu_suite_under_the_simulator():
    run_suite(PYTEST + ["tests/gpu"])


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_suite(ranks):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)
                           + os.pathsep + os.environ.get("PATH", ""))
    assert mpiexec, "mpiexec not found: pip install '.[test]' brings mpich"
    run_suite([mpiexec, "-n", str(ranks)] + PYTEST + ["tests/mpi"])
