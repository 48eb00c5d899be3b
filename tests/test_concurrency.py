"""Several Python threads at once, and a child forked after the parent used numba_bn."""
import subprocess
import sys
import textwrap
import threading

import numpy as np

import numba_bn as nbn
from numba_bn import cpu


def train_steps(seed, steps=5):
    rng = np.random.default_rng(seed)
    bn = nbn.BatchNorm2d(4 + seed, momentum=None)
    outputs = []
    for _ in range(steps):
        # Above the serial threshold: the threads race parallel launches.
        x = rng.normal(seed, 1 + seed, (3, 4 + seed, 48, 64)).astype(np.float32)
        assert x.size >= cpu._SERIAL_BELOW
        outputs.append(bn(x))
        outputs.append(bn.backward(np.ones_like(x)))
    return outputs, bn.state_dict()


def test_threads_give_the_sequential_results():
    sequential = [train_steps(seed) for seed in range(4)]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(seed):
        barrier.wait()
        results[seed] = train_steps(seed)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for (outs, state), (outs_seq, state_seq) in zip(results, sequential):
        for a, b in zip(outs, outs_seq):
            np.testing.assert_array_equal(a, b)
        for key in state_seq:
            np.testing.assert_array_equal(state[key], state_seq[key])


FORK_SCRIPT = textwrap.dedent("""
    import os, sys
    import numba
    import numpy as np
    import numba_bn as nbn

    # Large enough for the parallel kernels (small inputs run serially).
    x = np.random.default_rng(0).normal(3, 2, (8, 3, 64, 64)).astype(np.float32)
    from numba_bn import cpu
    assert x.size >= cpu._SERIAL_BELOW
    parent = nbn.BatchNorm2d(3)(x)
    print("parent threading layer", numba.threading_layer())
    pid = os.fork()
    if pid == 0:
        child = nbn.BatchNorm2d(3)(x)
        dx = nbn.BatchNorm2d(3)
        dx(x)
        dx.backward(np.ones_like(x))
        os._exit(0 if np.allclose(child, parent, rtol=1e-6, atol=1e-6) else 3)
    _, status = os.waitpid(pid, 0)
    print("child exit status", status)
    sys.exit(0 if status == 0 else 1)
""")


def test_forked_child_uses_numba_bn_after_parent():
    # A process of its own: pytest's has torch's OpenMP runtime loaded too.
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child exit status 0" in done.stdout
    assert "parent threading layer" in done.stdout
