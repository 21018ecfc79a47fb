"""Which CPUs compute full-range INT8 products exactly (app.inference.cpu_features)."""

from __future__ import annotations

import pytest

from app.inference.cpu_features import EXACT_INT8_DOT, has_exact_int8_dot, missing_features


@pytest.mark.parametrize(("machine", "flags", "expected"), [
    ("x86_64", frozenset({"avx2", "fma"}), False),  # vpmaddubsw: 16-bit pair sums saturate
    ("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}), True),
    ("AMD64", frozenset({"avx2", "avx_vnni"}), True),
    ("x86_64", frozenset({"avx2", "amx_int8"}), True),
    ("aarch64", None, True),  # NEON/SDOT accumulate in 32 bits
    ("x86_64", None, None),  # flags unreadable: cannot tell
])
def test_exact_int8_products_need_vnni_or_amx_on_x86_and_nothing_elsewhere(
    machine: str, flags: frozenset[str] | None, expected: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.inference.cpu_features as cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
    assert has_exact_int8_dot(machine) is expected


def test_an_unknown_or_unknowable_feature_counts_as_missing() -> None:
    assert missing_features([EXACT_INT8_DOT], exact_int8_dot=True) == []
    assert missing_features([EXACT_INT8_DOT], exact_int8_dot=False) == [EXACT_INT8_DOT]
    assert missing_features(["some_future_feature"], exact_int8_dot=True) == ["some_future_feature"]
    assert missing_features([], exact_int8_dot=False) == []
