"""`defectsynth run --threads`: 0 (the default) uses every usable core, -1 the idle ones."""
import pytest

from defectsynth import run


def test_default_is_one_thread_per_core_and_minus_one_subtracts_the_load(monkeypatch):
    monkeypatch.setattr(run, "usable_cores", lambda: 4)
    monkeypatch.setattr(run.os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert run.pick_threads(0) == 4  # the load does not matter by default
    assert run.pick_threads(3) == 3
    assert run.pick_threads(-1) == 1  # 4 cores - 2.6 -> 1.4 -> 1
    monkeypatch.setattr(run.os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert run.pick_threads(-1) == 1  # at least one
    monkeypatch.setattr(run.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert run.pick_threads(-1) == 4
    with pytest.raises(ValueError, match="--threads must be"):
        run.pick_threads(-2)


def test_usable_cores_is_the_affinity_mask():
    assert 1 <= run.usable_cores() <= (run.os.cpu_count() or 1)
