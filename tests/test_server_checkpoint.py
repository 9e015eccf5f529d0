"""Tests of server.checkpoint: global checkpoints, written atomically."""

from __future__ import annotations

import numpy as np
import pytest

from jras_core.config import ConfigError


def test_checkpoint_roundtrip_and_atomic(tmp_path, monkeypatch):
    import os

    from server import checkpoint as ck

    arrays = {"seg.w": np.arange(6, dtype=np.float32).reshape(2, 3), "seg.n": np.array(3, np.int64)}
    path = ck.save_checkpoint(tmp_path, ck.Checkpoint(round=4, arrays=arrays, config={"a": 1},
                                                      run_config={"strategy": "fedavg"},
                                                      strategy_state={"m_t.seg.w": np.ones((2, 3), np.float32)}))
    assert path == tmp_path / ck.CHECKPOINT_FILE
    back = ck.load_checkpoint(tmp_path)
    assert back.round == 4 and ck.arrays_equal(back.arrays, arrays)
    assert back.arrays["seg.n"].dtype == np.int64
    assert back.run_config == {"strategy": "fedavg"} and back.config == {"a": 1}
    assert set(back.strategy_state) == {"m_t.seg.w"}

    # a crash while replacing leaves the previous checkpoint intact and no temporary file
    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, ck.Checkpoint(round=5, arrays={k: v + 1 for k, v in arrays.items()}))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path).round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT_FILE]

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError):
        ck.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfigError):
        ck.load_checkpoint(tmp_path / "missing.pt")
