"""Tests of server.schedule: the rounds that carry the retrieval diagnostics."""

from __future__ import annotations


def test_diagnostics_every_nth_and_last_round():
    from server.settings import ServerSettings
    from server.strategies import build_strategy

    def rounds_with(settings: dict, offset: int = 0) -> list[int]:
        strategy = build_strategy(ServerSettings.from_run_config(settings), round_offset=offset)
        return [r for r in range(offset + 1, offset + settings["num-server-rounds"] + 1) if strategy.wants_diagnostics(r)]

    assert rounds_with({"num-server-rounds": 12}) == [5, 10, 12]
    assert rounds_with({"num-server-rounds": 12, "diagnostics-every": 1}) == list(range(1, 13))
    assert rounds_with({"num-server-rounds": 12, "diagnostics-every": 0}) == [12]
    assert rounds_with({"num-server-rounds": 4, "diagnostics-every": 3}, offset=8) == [9, 12]
