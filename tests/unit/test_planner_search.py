"""The estimate of one strategy, the search, the pins, and the JSON and TOML it writes."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from layerwise.planner import Cluster, DeviceGroup, ModelSpec, Pins, Strategy, StrategyError, estimate, load_hf_config, plan
from layerwise.planner import memory as mem
from layerwise.planner.units import layer_units
from layerwise.planner.report import candidate_dict, to_json, train_config

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llama-70b.json"
KEYS = {"dp", "tp", "pp", "schedule", "chunks", "microbatch_size", "microbatches", "zero_stage", "recompute",
        "offload", "params", "memory_bytes", "step_time_s", "tflops_per_device", "mfu", "bubble_fraction",
        "feasible", "why"}


@pytest.fixture(scope="module")
def llama() -> ModelSpec:
    return load_hf_config(FIXTURE)


@pytest.fixture(scope="module")
def h100x64() -> Cluster:
    return Cluster.uniform(devices=64, devices_per_node=8, memory_gib=80, tflops=989)


def test_compute_only_step_is_flops_over_speed() -> None:
    # One device, no pipeline, no communication: the step is the step's FLOPs at the device speed.
    model = ModelSpec(layers=4, hidden=256, heads=4, vocab=1000, seq=128)
    cluster = Cluster.uniform(devices=1, devices_per_node=1, memory_gib=1000, tflops=100, efficiency=0.5)
    for rc in ("none", "full"):
        e = estimate(model, cluster, Strategy(dp=1, tp=1, pp=1, micro=2, recompute=rc), 16)
        update = model.params() / cluster.optimizer_params_per_s  # the optimizer updates every parameter
        assert e.step_time == pytest.approx(model.step_flops(16, recompute=rc == "full") / 50e12 + update, rel=1e-12)
        assert e.bubble_fraction == 0 and e.microbatches == 8
        assert e.tflops_per_device == pytest.approx(50.0 * (e.step_time - update) / e.step_time)


def test_memory_breakdown_is_zero_states_plus_activations() -> None:
    model = ModelSpec(layers=6, hidden=512, heads=8, vocab=5000, seq=256)
    cluster = Cluster.uniform(devices=8, devices_per_node=8, memory_gib=80, tflops=100)
    mixed = mem.PRECISIONS["mixed"]
    block = mem.layer_activation_bytes(model, micro=1, tp=1, sp=False, recompute="none", precision=mixed)
    emb = mem.embedding_activation_bytes(model, micro=1, tp=1, sp=False, precision=mixed)
    head = mem.head_activation_bytes(model, micro=1, tp=1, sp=False, precision=mixed)
    for zero in range(4):
        e = estimate(model, cluster, Strategy(dp=4, tp=1, pp=2, micro=1, zero_stage=zero), 32)
        first, second = e.partition
        # 1F1B: stage 0 holds min(m, p) = 2 microbatches, stage 1 one; ZeRO-3 adds two gathered
        # FSDP units (the runtime's: each large matrix its own), the largest being the head's copy
        # of the tied embedding on the last stage.
        acts = [2 * ((first - 1) * block + emb), (second - 1) * block + head]
        units = [u for mods in (model.embedding_modules(), model.block_modules(), model.head_modules(own_copy=True))
                 for u in layer_units(mods, zero3=True)]
        assert max(units) == model.vocab * model.hidden
        extra = 2 * max(units) * 2 if zero == 3 else 0
        rows = []
        for r in range(2):
            st = mem.model_states(e.rank_params[r], dp=4, zero_stage=zero)
            buckets = 2 * e.rank_params[r] if zero == 0 else 0  # DDP's gradient buckets
            rows.append((st.total + buckets + acts[r] + extra, st, acts[r] + extra, buckets))
        total, states, act, buckets = max(rows, key=lambda row: row[0])
        assert e.memory["params"] == pytest.approx(states.params)
        assert e.memory["grads"] == pytest.approx(states.grads + buckets)
        assert e.memory["optimizer"] == pytest.approx(states.optimizer)
        assert e.memory["activations"] == pytest.approx(act)
        assert e.memory["total"] == pytest.approx(total)
        # The tied head keeps its own copy of the embedding on the last stage.
        assert e.rank_params[1] == pytest.approx((second - 1) * model.params_per_layer() + model.head_params()
                                                 + model.vocab * model.hidden)


def test_llama_70b_on_64_devices(llama: ModelSpec, h100x64: Cluster) -> None:
    result = plan(llama, h100x64, 512)
    best = result.best
    assert best is not None and best.feasible
    assert best.strategy.dp * best.strategy.tp * best.strategy.pp == 64
    assert best.memory["total"] <= best.budget <= 80 * 2**30
    times = [e.step_time for e in result.candidates]
    assert times == sorted(times) and len(times) == 5
    out = to_json(result)
    assert set(out) == {"best", "candidates"}
    assert all(set(c) == KEYS for c in out["candidates"])
    assert set(out["best"]["memory_bytes"]) == {"params", "grads", "optimizer", "activations", "total"}
    assert out["best"]["params"] == 68_976_648_192
    json.dumps(out)  # plain data
    assert "Fits" in out["best"]["why"]


def test_pins_are_kept(llama: ModelSpec, h100x64: Cluster) -> None:
    result = plan(llama, h100x64, 512, pins=Pins(tp=8, pp=4, recompute="full", schedule="interleaved"))
    assert result.candidates
    for e in result.candidates:
        s = e.strategy
        assert (s.tp, s.pp, s.dp, s.recompute, s.schedule) == (8, 4, 2, "full", "interleaved")


def test_a_pinned_strategy_that_does_not_fit_is_reported_not_replaced(llama: ModelSpec, h100x64: Cluster) -> None:
    pins = Pins(dp=64, tp=1, pp=1, zero_stage=0, recompute="none", offload=False, micro=1)
    result = plan(llama, h100x64, 512, pins=pins)
    assert result.candidates and not any(e.feasible for e in result.candidates)
    c = candidate_dict(result.candidates[0])
    assert (c["dp"], c["tp"], c["pp"], c["zero_stage"], c["recompute"], c["feasible"]) == (64, 1, 1, 0, "none", False)
    assert "needs" in c["why"] and "usable" in c["why"]


def test_a_pin_that_breaks_a_rule_says_which(llama: ModelSpec, h100x64: Cluster) -> None:
    result = plan(llama, h100x64, 512, pins=Pins(tp=16))
    out = to_json(result)
    assert out["best"]["feasible"] is False
    assert "inside a node" in out["best"]["why"]
    none = to_json(plan(llama, h100x64, 512, pins=Pins(dp=3)))
    assert none["best"]["feasible"] is False and "no dp x tp x pp makes 64 devices" in none["best"]["why"]
    with pytest.raises(StrategyError, match="multiple of dp x microbatch"):
        estimate(llama, h100x64, Strategy(dp=64, tp=1, pp=1, micro=3), 512)


def test_devices_that_differ_get_layers_by_speed() -> None:
    model = ModelSpec(layers=16, hidden=256, heads=4, vocab=512, seq=128)
    fast = DeviceGroup(name="fast", count=2, memory_bytes=16 * 2**30, tflops=200)
    slow = DeviceGroup(name="slow", count=2, memory_bytes=16 * 2**30, tflops=100)
    cluster = Cluster(groups=(fast, slow), devices_per_node=2, intra_node_bw=100e9, inter_node_bw=10e9)
    e = estimate(model, cluster, Strategy(dp=1, tp=1, pp=4, micro=1), 8)
    blocks = list(e.partition)
    assert blocks[0] + blocks[1] > blocks[2] + blocks[3]  # the fast half holds more
    same = estimate(model, replace(cluster, groups=(replace(slow, count=4),)), Strategy(dp=1, tp=1, pp=4, micro=1), 8)
    assert e.step_time < same.step_time
    with pytest.raises(StrategyError, match="span device groups"):
        estimate(model, replace(cluster, groups=(replace(fast, count=1), replace(slow, count=3))),
                 Strategy(dp=2, tp=1, pp=2, micro=1), 8)


def test_train_config_is_flat_toml_with_trains_keys(llama: ModelSpec, h100x64: Cluster) -> None:
    best = plan(llama, h100x64, 512).best
    assert best is not None
    data = tomllib.loads(train_config(best, seq=llama.seq))
    keys = {"stages", "schedule", "microbatches", "chunks", "dp", "tp", "batch_size", "seq_len",
            "activation_checkpointing", "precision"}
    assert set(data) == keys | ({"data_parallel"} if best.strategy.dp > 1 else set())
    s = best.strategy
    assert (data["stages"], data["dp"], data["tp"], data["schedule"]) == (s.pp, s.dp, s.tp, s.schedule)
    assert data["batch_size"] == 512 and data["microbatches"] == best.microbatches
    assert data["activation_checkpointing"] == s.recompute and data["precision"] == "bf16"


LLAMA_LIKE = ModelSpec(layers=16, hidden=2048, heads=16, kv_heads=4, ffn=5504, gated_mlp=True, bias=False,
                       norm="rmsnorm", learned_positions=False, tied_head=False, dropout=False, vocab=32000, seq=2048)
GPT_LIKE = ModelSpec(layers=12, hidden=1024, heads=16, vocab=32000, seq=1024)


@pytest.mark.parametrize(("model", "memory_gib", "pp"),
                         [(GPT_LIKE, 4, None), (GPT_LIKE, 4, 2), (LLAMA_LIKE, 4, 2), (LLAMA_LIKE, 4, 4), (LLAMA_LIKE, 8, 4)])
def test_two_passes_find_the_exhaustive_best(model: ModelSpec, memory_gib: int, pp: int | None) -> None:
    # The search ranks by closed forms (and bounds interleaving's memory) and replays only the
    # fastest; on a cluster small enough to price every strategy exactly, it finds the same best.
    from layerwise.planner.search import enumerate_strategies

    cluster = Cluster.uniform(devices=16, devices_per_node=4, memory_gib=memory_gib, tflops=100)
    pins = Pins(pp=pp)
    best = plan(model, cluster, 64, pins=pins).best
    assert best is not None and best.feasible
    exact = []
    for s in enumerate_strategies(model, cluster, 64, pins):
        for offload in (False, True):
            try:
                e = estimate(model, cluster, replace(s, offload=offload), 64)
            except StrategyError:
                continue
            if e.feasible:
                exact.append(e.step_time)
    assert best.step_time == pytest.approx(min(exact), rel=1e-12)
