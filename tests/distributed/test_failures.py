"""A rank that dies or raises stops every rank, with an error naming the rank that failed."""

from __future__ import annotations

import glob

import pytest

import layerwise

from .workers import bad_boundary, die_mid_step, make_pipeline

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]


def test_killed_rank_stops_everyone_and_is_named() -> None:
    before = set(glob.glob("/dev/shm/layerwise-*"))
    with pytest.raises(layerwise.LaunchError) as info:
        layerwise.launch(die_mid_step, 4, 2, 30.0, timeout=120, grace=60)
    err = info.value
    assert err.rank == 2
    text = str(err)
    assert text.startswith("rank 2 (stage 2) died: killed by signal 9 (SIGKILL)"), text
    # the others noticed on their own (none had to be stopped by the launcher) and say whom they lost
    assert "still running" not in text, text
    assert "lost rank" in text, text
    assert set(glob.glob("/dev/shm/layerwise-*")) <= before, "the launcher removes the slots nobody received"


def test_hung_rank_is_caught_by_the_timeout_and_named() -> None:
    with pytest.raises(layerwise.LaunchError) as info:
        layerwise.launch(die_mid_step, 3, 1, 4.0, "hang", timeout=120, grace=20)
    text = str(info.value)
    assert info.value.rank == 1
    assert text.startswith("rank 1 (stage 1) hung"), text
    assert "lost rank 1 (stage 1)" in text, text


def test_stage_boundary_that_does_not_fit_names_layer_and_stage() -> None:
    with pytest.raises(layerwise.LaunchError) as info:
        layerwise.launch(bad_boundary, 2, timeout=120)
    text = str(info.value)
    first = text.splitlines()[0]
    assert info.value.rank == 1
    assert first.startswith("rank 1 (stage 1) failed: StageError: rank 1 (stage 1): layer 1 (Linear(in_features=8"), first
    assert "microbatch 0" in first and "(2, 16)" in first and "split point" in first
    assert "Traceback" not in text


def test_wrong_world_size_says_what_to_change() -> None:
    with pytest.raises(layerwise.LaunchError) as info:
        layerwise.launch(make_pipeline, 2, {"stages": 4}, timeout=120)
    assert "dp x pp x tp = 1 x 4 x 1 = 4, but there are 2 processes: start 4 processes" in str(info.value)
    assert "--nproc-per-node 4" in str(info.value)


def test_more_stages_than_layers() -> None:
    with pytest.raises(layerwise.LaunchError) as info:
        layerwise.launch(make_pipeline, 2, {"depth": 3, "schedule": "interleaved", "chunks": 2}, timeout=120)
    text = str(info.value)
    assert "4 stages but the model has only 3 layers" in text
    assert "2 ranks x 2 chunks" in text
