"""Parameter counts and FLOPs against Narayanan et al. (2021) and against models built from the
same config; model-state memory against the ZeRO paper's Table 1; activation memory against
Korthikanti et al. (2022) Table 2."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from layerwise.planner import ModelSpec, from_hf_config, load_hf_config, model_states
from layerwise.planner.memory import layer_activation_elements
from layerwise.planner.model import ModelSpecError, eq2_params, eq3_flops

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llama-70b.json"


def _gpt3(layers: int, hidden: int, heads: int, vocab: int, seq: int, **kw: object) -> ModelSpec:
    """GPT-3's layer as Eq. 2 counts it: no final LayerNorm."""
    return ModelSpec(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=seq, final_norm=False, **kw)


@pytest.mark.parametrize("shape", [(24, 2304, 24, 51200, 2048), (128, 25600, 160, 51200, 2048), (3, 64, 4, 256, 64)])
def test_params_equal_eq2(shape: tuple[int, ...]) -> None:
    layers, hidden, heads, vocab, seq = shape
    spec = _gpt3(layers, hidden, heads, vocab, seq)
    assert spec.params() == pytest.approx(eq2_params(layers, hidden, vocab, seq), rel=1e-12)


def test_params_of_megatron_table1_rows() -> None:
    # Narayanan et al. (2021), Table 1's "number of parameters (billion)" column.
    rows = [((24, 2304, 24), 1.7), ((30, 3072, 32), 3.6), ((36, 4096, 32), 7.5), ((40, 6144, 48), 18.4),
            ((48, 8192, 64), 39.1), ((60, 10240, 80), 76.1), ((80, 12288, 96), 145.6),
            ((96, 16384, 128), 310.1), ((105, 20480, 128), 529.6), ((128, 25600, 160), 1008.0)]  # fmt: skip
    for (layers, hidden, heads), billions in rows:
        spec = _gpt3(layers, hidden, heads, 51200, 2048)
        assert round(spec.params() / 1e9, 1) == billions, (layers, hidden)


def test_flops_equal_eq3() -> None:
    for layers, hidden, heads in [(24, 2304, 24), (96, 16384, 128)]:
        spec = _gpt3(layers, hidden, heads, 51200, 2048)
        assert spec.step_flops(512, recompute=True) == pytest.approx(eq3_flops(512, layers, hidden, 51200, 2048), rel=1e-12)
        # Without recomputation the blocks take 3 passes, not 4: 72 B s l h^2 (1 + s/6h) + 6 B s h V.
        b, s, l, h, v = 512, 2048, layers, hidden, 51200
        assert spec.step_flops(b, recompute=False) == pytest.approx(72 * b * s * l * h * h * (1 + s / (6 * h)) + 6 * b * s * h * v)


def test_params_of_the_builtin_gpt() -> None:
    torch = pytest.importorskip("torch")
    from layerwise.models import GPT, GPTConfig

    for blocks, width, heads, vocab, context in [(3, 64, 4, 256, 64), (2, 48, 6, 97, 33)]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab=vocab, context=context, width=width, heads=heads, blocks=blocks))
        spec = ModelSpec(layers=blocks, hidden=width, heads=heads, vocab=vocab, seq=context)
        built = sum(p.numel() for p in model.parameters())  # the tied head counted once
        assert spec.params() == built
        # Eq. 2 plus the final LayerNorm (2h), which Eq. 2 leaves out.
        assert spec.params() == round(eq2_params(blocks, width, vocab, context)) + 2 * width


def test_fsdp_units_are_the_runtimes() -> None:
    # The planner's modules and ZeRO-3 units of a layer are what layerwise.parallel.data builds:
    # the modules holding their own parameters, and those of >= BIG elements as units of their own.
    torch = pytest.importorskip("torch")
    from layerwise.models import GPT, GPTConfig
    from layerwise.parallel import data
    from layerwise.planner.units import BIG, layer_units

    assert BIG == data._BIG
    for width, vocab, context in [(256, 256, 128), (128, 1000, 64), (64, 256, 64)]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab=vocab, context=context, width=width, heads=4, blocks=2, tie_embeddings=False))
        spec = ModelSpec(layers=2, hidden=width, heads=4, vocab=vocab, seq=context, tied_head=False, fused_qkv=True)
        layers = list(model.pipeline_layers())
        emb, block, head = layers[0], layers[1], layers[-1]
        for layer, mods in ((emb, spec.embedding_modules()), (block, spec.block_modules()),
                            (head, spec.head_modules(own_copy=False))):  # fmt: skip
            own = sorted(sum(p.numel() for p in m.parameters(recurse=False)) for _, m in layer.named_modules())
            assert sorted(mods) == [n for n in own if n], type(layer).__name__
            big = [sum(p.numel() for p in m.parameters()) for m in data._big_submodules(layer, [])]
            rest = sum(p.numel() for p in layer.parameters()) - sum(big)
            assert sorted(layer_units(mods, zero3=True)) == sorted(big + ([rest] if rest else []))
            assert layer_units(mods, zero3=False) == [sum(p.numel() for p in layer.parameters())]


@pytest.mark.parametrize("spec", [ModelSpec(layers=2, hidden=64, heads=4, vocab=99, seq=16),
                                  ModelSpec(layers=2, hidden=64, heads=4, vocab=99, seq=16, fused_qkv=True),
                                  ModelSpec(layers=2, hidden=64, heads=8, kv_heads=2, ffn=172, gated_mlp=True,
                                            bias=False, norm="rmsnorm", vocab=99, seq=16)])
def test_block_modules_add_up_to_the_layer(spec: ModelSpec) -> None:
    assert sum(spec.block_modules()) == spec.params_per_layer()
    # matrices (Q/K/V fused or three, output, 2 or 3 MLP) and the two norms
    assert len(spec.block_modules()) == (4 if spec.fused_qkv else 6) + spec.gated_mlp + 2


@pytest.mark.parametrize("tied", [False, True])
def test_params_of_a_tiny_hf_llama(tied: bool) -> None:
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config)
    spec = from_hf_config(config.to_dict())
    assert spec.gated_mlp and not spec.bias and spec.kv_heads_ == 2 and spec.seq == 128
    assert spec.params() == sum(p.numel() for p in model.parameters())


def test_llama_70b_fixture() -> None:
    spec = load_hf_config(FIXTURE)
    # Llama-2-70b-hf's published parameter count.
    assert spec.params() == 68_976_648_192
    assert (spec.layers, spec.hidden, spec.kv_heads_, spec.seq) == (80, 8192, 8, 4096)


def test_bad_specs_are_one_line_errors() -> None:
    with pytest.raises(ModelSpecError, match="divisible by heads"):
        ModelSpec(layers=2, hidden=10, heads=3, vocab=5, seq=4)
    with pytest.raises(ModelSpecError, match="kv_heads"):
        ModelSpec(layers=2, hidden=12, heads=6, kv_heads=4, vocab=5, seq=4)
    with pytest.raises(ModelSpecError, match="no hidden_size"):
        from_hf_config({"num_hidden_layers": 2})


# --- ZeRO, Table 1: per-device model-state memory of the 7.5B model, in GB -------------------

ZERO_TABLE1_7_5B = {  # N_d: (baseline, P_os, P_os+g, P_os+g+p)
    1: ("120", "120", "120", "120"),
    4: ("120", "52.5", "41.25", "30"),
    16: ("120", "35.6", "21.6", "7.5"),
    64: ("120", "31.4", "16.6", "1.88"),
    256: ("120", "30.4", "15.4", "0.47"),
    1024: ("120", "30.1", "15.1", "0.12"),
}


@pytest.mark.parametrize("nd", sorted(ZERO_TABLE1_7_5B))
def test_model_states_equal_zero_table1(nd: int) -> None:
    for stage, text in enumerate(ZERO_TABLE1_7_5B[nd]):
        gb = model_states(7.5e9, dp=nd, zero_stage=stage).total / 1e9
        digits = len(text.split(".")[1]) if "." in text else 0
        assert round(gb, digits) == float(text), (nd, stage, gb)


# --- Korthikanti et al. (2022), Table 2: activation bytes per layer --------------------------

def test_activations_equal_korthikanti_table2() -> None:
    rng = random.Random(0)
    for _ in range(50):
        heads = rng.choice([4, 8, 16, 32])
        h = heads * rng.choice([8, 16, 64])
        s, b, t = rng.choice([128, 512, 2048]), rng.randint(1, 8), rng.choice([1, 2, 4, 8])
        spec = ModelSpec(layers=2, hidden=h, heads=heads, vocab=1000, seq=s)
        a, sbh = heads, s * b * h

        def act(rc: str, sp: bool) -> float:
            return layer_activation_elements(spec, micro=b, tp=t, sp=sp, recompute=rc)

        assert act("none", False) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
        assert act("none", True) == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
        assert act("selective", False) == pytest.approx(sbh * (10 + 24 / t))
        assert act("selective", True) == pytest.approx(sbh * 34 / t)
        assert act("full", False) == pytest.approx(2 * sbh)
        if t == 1:  # "no parallelism" row
            assert act("none", False) == pytest.approx(sbh * (34 + 5 * a * s / h))


def test_importing_the_planner_does_not_import_torch() -> None:
    code = ("import sys, layerwise.planner, layerwise.commands.plan; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
