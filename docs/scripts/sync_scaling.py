"""SyncBatchNorm scaling on this machine: 1 and 2 MPI processes.

One global batch of (32, 64, 28, 28) float32 is split over k processes
(k = 1, 2), each with ``2 // k`` Numba threads so that the machine's cores
are used the same way; the script times a training step (forward and
backward) per process, the same step of a plain BatchNorm2d on the whole
batch in one process, and the bare collective SyncBatchNorm makes per call.
It writes ``docs/_data/sync_scaling.json`` and draws
``docs/figures/sync_scaling.png``.

Run from the repository root: ``python docs/scripts/sync_scaling.py``
(it starts ``mpiexec`` itself).
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

GLOBAL_SHAPE = (32, 64, 28, 28)
PROCESSES = (1, 2)
ROUNDS = 100


def median_seconds(step, rounds=ROUNDS):
    for _ in range(3):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def worker():
    """One rank's measurement; rank 0 prints the JSON line."""
    from mpi4py import MPI

    import numba_bn as nbn
    comm = MPI.COMM_WORLD
    n = GLOBAL_SHAPE[0] // comm.size
    rng = np.random.default_rng(comm.rank)
    x = rng.normal(size=(n,) + GLOBAL_SHAPE[1:]).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    sync = nbn.SyncBatchNorm(GLOBAL_SHAPE[1])

    def sync_step():
        comm.Barrier()
        sync(x)
        sync.backward(dy)

    result = {"processes": comm.size, "sync_step": median_seconds(sync_step)}
    # The forward's message: [ok, count] and three per-channel vectors.
    gathered = np.zeros((comm.size, 2 + 3 * GLOBAL_SHAPE[1]))
    result["collective"] = median_seconds(
        lambda: comm.Allgather(MPI.IN_PLACE, gathered))
    if comm.size == 1:
        plain = nbn.BatchNorm2d(GLOBAL_SHAPE[1])

        def plain_step():
            plain(x)
            plain.backward(dy)
        result["plain_step"] = median_seconds(plain_step)
    if comm.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def main():
    sys.path.insert(0, os.path.dirname(__file__))
    from _stamp import DATA, save, stamp
    results = []
    for k in PROCESSES:
        env = dict(os.environ, NUMBA_NUM_THREADS=str(max(1, 2 // k)))
        done = subprocess.run(
            ["mpiexec", "-n", str(k), sys.executable, __file__, "--worker"],
            env=env, capture_output=True, text=True, check=True)
        line = [ln for ln in done.stdout.splitlines()
                if ln.startswith("RESULT ")][0]
        results.append(json.loads(line[len("RESULT "):]))
        print(results[-1])
    with open(os.path.join(DATA, "sync_scaling.json"), "w") as f:
        json.dump({"global_shape": GLOBAL_SHAPE, "results": results}, f,
                  indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, values = [], []
    labels.append("BatchNorm2d\n1 process, 2 threads")
    values.append(results[0]["plain_step"])
    for r in results:
        labels.append(f"SyncBatchNorm\n{r['processes']} process"
                      f"{'es' if r['processes'] > 1 else ''}, "
                      f"{max(1, 2 // r['processes'])} thread"
                      f"{'s' if r['processes'] == 1 else ''} each")
        values.append(r["sync_step"])
    bars = ax.bar(range(len(values)), [v * 1e3 for v in values], 0.6)
    for bar, r in zip(bars[1:], results):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                f"collective {r['collective'] * 1e6:.1f} µs", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("ms per training step (fwd + bwd)")
    ax.set_title(f"Global batch {GLOBAL_SHAPE} float32 on 2 cores")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    stamp(fig, "sync_scaling.py")
    save(fig, "sync_scaling")
    plt.close(fig)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
