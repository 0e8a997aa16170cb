"""The ranks' malloc setting: on by default, off with LAYERWISE_KEEP_HEAP=0."""

from __future__ import annotations

import sys

import pytest

from layerwise.runtime.malloc import keep_heap


def test_keep_heap_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERWISE_KEEP_HEAP", "0")
    assert keep_heap() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_heap_takes_effect_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERWISE_KEEP_HEAP", raising=False)
    assert keep_heap() is True
