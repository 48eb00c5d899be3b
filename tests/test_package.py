"""The main job, import hygiene, Numba's global configuration, bench targets."""
import subprocess
import sys
import textwrap


def run_python(code, *args):
    return subprocess.run([sys.executable, *args] if not code else
                          [sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_main_job_runs_and_checks_against_float64():
    done = run_python(None, "-m", "numba_bn", "--shape", "4", "3", "5", "5",
                      "--steps", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "largest relative difference from float64" in done.stdout
    assert "ms per training step" in done.stdout and "(ok" in done.stdout


def test_import_touches_neither_cupy_nor_cuda_nor_mpi():
    done = run_python("""
        import sys, numpy as np, numba_bn
        numba_bn.BatchNorm2d(2)(np.ones((2, 2, 2, 2), np.float32))
        loaded = [m for m in ("cupy", "numba.cuda", "numba_bn.cuda", "mpi4py")
                  if m in sys.modules]
        print(loaded)
        sys.exit(1 if loaded else 0)
    """)
    assert done.returncode == 0, done.stdout + done.stderr


def test_numba_configuration_is_left_alone():
    done = run_python("""
        import numba
        before = (numba.config.THREADING_LAYER, numba.get_num_threads())
        import numpy as np, numba_bn
        bn = numba_bn.BatchNorm2d(2)
        bn(np.ones((2, 2, 3, 3), np.float32))
        bn.backward(np.ones((2, 2, 3, 3), np.float32))
        after = (numba.config.THREADING_LAYER, numba.get_num_threads())
        assert before == after, (before, after)
    """)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bench_holds_n_c_batches_to_the_channels_last_targets():
    # PyTorch's CPU kernels treat (N, C) as channels-last (vectorized), so
    # the 0.5x target set against its scalar NCHW loop does not apply.
    from numba_bn.bench import target_ratio
    assert target_ratio("train", (1024, 256), "nchw") == 0.9
    assert target_ratio("train", (8, 16, 32, 32), "nchw") == 0.5
    assert target_ratio("train", (8, 16, 32, 32), "channels_last") == 0.9
    assert target_ratio("backward", (1024, 256), "nchw") == 0.8


def test_bench_takes_each_floor_at_its_own_cases_bandwidth(tmp_path,
                                                           monkeypatch):
    # The machines' bandwidth drifts within a run: each case's floor share
    # must use the copy timed for that case, not one measured at the start.
    import json

    from numba_bn import bench
    measured = iter([10e9, 40e9] * 10)
    monkeypatch.setattr(bench.CopyProbe, "bandwidth",
                        lambda self, repeats=5: next(measured))
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(8, 16, 32, 32)])
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--no-torch", "--rounds", "1",
                       "--json", str(path)]) == 0
    run = json.loads(path.read_text())
    cases, fused = run["cases"], run["fused_cases"]
    assert [c["copy_bandwidth_bytes_per_s"] for c in cases + fused] == [
        10e9, 40e9, 10e9, 40e9, 10e9, 40e9, 10e9, 40e9, 10e9, 40e9]
    # The fused cases' floors count the fused passes (issue 29's table).
    passes = [bench.PASSES[c["op"]] for c in cases] + [3, 4, 2, 7]
    for c, n in zip(cases + fused, passes):
        floor = (n * 8 * 16 * 32 * 32 * 4
                 / c["copy_bandwidth_bytes_per_s"] / c["seconds"]["numba_bn"])
        assert abs(c["floor_share"] - floor) <= 1e-9 * floor
