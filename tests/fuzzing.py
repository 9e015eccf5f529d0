"""Hypothesis settings and strategies for the property-based tests of the entry points that
read user input: the NIfTI and PNG loaders, the YAML loader and the method, site and server
configuration parsers.

Whatever the input, they either succeed or raise the project's own error
(``DataError`` / ``ConfigError``) with a one-line message naming the source; never
another exception type (which the CLI would show as a traceback).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def damage_bytes(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data if cut is None else data[: cut % (len(data) + 1)])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


damages = st.tuples(
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
)


def only_our_error(call, error: type[Exception], name: str) -> None:
    try:
        call()
    except error as exc:
        text = str(exc)
        assert name in text and "\n" not in text, text


any_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["unet", "concat", "prior", "utility", "mask", "frozen", "flat"]),
)

any_value = st.recursive(any_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
