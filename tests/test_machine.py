"""The CPU thresholds follow the caches the machine reports."""
import os

import pytest

from numba_bn import _machine, cpu


def fake_sysfs(root, caches):
    """A sysfs cache folder with ``(level, type, size)`` entries."""
    for i, (level, kind, size) in enumerate(caches):
        entry = root / f"index{i}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "size").write_text(f"{size}\n")
        (entry / "coherency_line_size").write_text("128\n" if level == 1 else "64\n")
    return str(root)


@pytest.mark.parametrize("l2, l3, l2_text, l3_text", [
    (256 << 10, 8 << 20, "256K", "8192K"),     # a small laptop core
    (2 << 20, 256 << 20, "2048K", "256M"),     # a large server die
])
def test_thresholds_follow_the_reported_caches(tmp_path, l2, l3, l2_text, l3_text):
    root = fake_sysfs(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"),
                                 (2, "Unified", l2_text), (3, "Unified", l3_text)])
    assert _machine.caches(root) == (l2, l3, 128)
    assert cpu.thresholds(l2, l3) == {
        "stream_working_set": 3 * l3 // 4, "from_memory": l3 // 4,
        "per_channel": 2 * l2, "unrolled_gradient_sums": 4 * l2}


def test_without_an_l3_the_l2_is_the_last_level(tmp_path):
    root = fake_sysfs(tmp_path, [(1, "Data", "64K"), (2, "Unified", "4096K")])
    assert _machine.caches(root)[:2] == (4 << 20, 4 << 20)


def test_without_sysfs_sysconf_then_the_fallbacks(tmp_path, monkeypatch):
    missing = str(tmp_path / "none")
    monkeypatch.setattr(_machine.os, "sysconf_names", {})
    assert _machine.caches(missing) == (_machine.FALLBACK_L2, _machine.FALLBACK_L3,
                                        _machine.FALLBACK_LINE)
    monkeypatch.setattr(_machine.os, "sysconf_names",
                        {"SC_LEVEL2_CACHE_SIZE": 1, "SC_LEVEL3_CACHE_SIZE": 2})
    monkeypatch.setattr(_machine.os, "sysconf", lambda name: {
        "SC_LEVEL2_CACHE_SIZE": 512 << 10, "SC_LEVEL3_CACHE_SIZE": 16 << 20}[name])
    assert _machine.caches(missing)[:2] == (512 << 10, 16 << 20)


def test_sysfs_wins_over_sysconf(tmp_path, monkeypatch):
    """getconf on the project's VMs claims a 320 MiB L3 where sysfs says 32."""
    root = fake_sysfs(tmp_path, [(2, "Unified", "1024K"), (3, "Unified", "32768K")])
    monkeypatch.setattr(_machine.os, "sysconf_names", {"SC_LEVEL3_CACHE_SIZE": 1})
    monkeypatch.setattr(_machine.os, "sysconf", lambda name: 320 << 20)
    assert _machine.caches(root)[1] == 32 << 20


@pytest.mark.skipif(_machine.caches()[:2] != (1 << 20, 32 << 20),
                    reason="the project's 2-core EPYC VMs report 1 MiB L2, 32 MiB L3")
def test_on_the_project_machines_the_measured_values():
    assert (cpu._STREAM_WORKING_SET, cpu._FROM_MEMORY_BYTES, cpu._PER_CHANNEL_BYTES,
            cpu._UNROLLED_GRADIENT_SUMS_BYTES) == (24 << 20, 8 << 20, 2 << 20, 4 << 20)
    assert os.path.isdir(_machine.SYSFS)
