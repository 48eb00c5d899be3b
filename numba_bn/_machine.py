"""The CPU's cache sizes, as the machine reports them, for ``cpu.py``'s thresholds.

Sources, first that answers wins:

1. Linux sysfs, ``/sys/devices/system/cpu/cpu0/cache/index*/``: the caches
   of the first core as the kernel enumerates them, the L3 being the slice
   that core shares with its neighbours;
2. ``os.sysconf`` where Python has the name (``SC_LEVEL2_CACHE_SIZE``,
   ``SC_LEVEL3_CACHE_SIZE``; Python 3.11 has none of them);
3. the fallback sizes below.

sysfs wins over ``sysconf``/``getconf`` because glibc derives the latter
from CPUID, which on virtual machines and multi-die processors can count
the L3 of every die (320 MiB on one 2-core cloud VM whose sysfs, rightly,
says 32 MiB): a pass's working set competes with the slice its core sees.
"""
import os

SYSFS = "/sys/devices/system/cpu/cpu0/cache"

FALLBACK_L2 = 1 << 20
"""Per-core L2 bytes when the machine does not say (common on current x86)."""
FALLBACK_L3 = 32 << 20
"""Shared L3 bytes when the machine does not say."""
FALLBACK_LINE = 64
"""Cache line bytes when the machine does not say (x86 and most ARM cores)."""


def _parse_size(text):
    """``"1024K"``, ``"32M"`` or ``"65536"`` as bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _from_sysfs(root):
    """``{level: size}`` of the data and unified caches, and the line size."""
    sizes, line = {}, None
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return sizes, line
    for entry in entries:
        if not entry.startswith("index"):
            continue
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "size")) as f:
                size = _parse_size(f.read())
            if kind in ("Data", "Unified"):
                sizes[level] = size
                if line is None and level == 1:
                    with open(os.path.join(path,
                                           "coherency_line_size")) as f:
                        line = int(f.read())
        except (OSError, ValueError):
            continue
    return sizes, line


def _from_sysconf(name):
    if name not in os.sysconf_names:
        return None
    try:
        value = os.sysconf(name)
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def caches(root=SYSFS):
    """``(l2, l3, line)``: per-core L2 bytes, shared L3 bytes, line bytes.

    Parameters
    ----------
    root : str, optional
        The sysfs cache folder (tests pass a fake one).

    Returns
    -------
    tuple of int
        Each from the first source that reports it (see the module
        docstring). A machine without an L3 reports its L2 as the last
        level.
    """
    sizes, line = _from_sysfs(root)
    l2 = (sizes.get(2) or _from_sysconf("SC_LEVEL2_CACHE_SIZE")
          or FALLBACK_L2)
    l3 = sizes.get(3)
    if l3 is None:  # no L3 in sysfs: the L2 is the last level, if sysfs spoke
        l3 = l2 if sizes else (_from_sysconf("SC_LEVEL3_CACHE_SIZE")
                               or FALLBACK_L3)
    line = (line or _from_sysconf("SC_LEVEL1_DCACHE_LINESIZE")
            or FALLBACK_LINE)
    return l2, l3, line
