"""Shipped models: their parameter counts against published figures, and the model loader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moesim.errors import ScenarioError
from moesim.spec.model import AttentionSpec, ModelSpec
from moesim.spec.models import find_model, list_models, load_model

SHIPPED = {"mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "qwen3-30b-a3b", "qwen3-235b-a22b",
           "qwen2-57b-a14b", "switch-base-128", "gpt4-rumoured-16x111b", "gpt-oss-120b",
           "glam-64e", "tiny-cpu"}

# Published (total, active) figures, as printed by their source.
# A count agrees with a figure when it is within 1% of it, or within half a unit of the figure's
# last printed digit ("1.2T" only claims 1.15T..1.25T). "trunc" marks a figure that its publisher
# truncates rather than rounds (Qwen prints 3.35B as 3.3B, as it printed Qwen1.5-MoE's 2.06B
# non-embedding activated parameters as 2.0B).
# no_input_emb: the publisher's "active" leaves out the input embedding table (a lookup, not a
# matmul). DeepSeek does (V2-Lite: 2.66B with it, 2.45B without, published 2.4B) and so does
# OpenAI (5.71B with it, 5.13B without, published 5.13B); Mistral and Qwen count it.
PUBLISHED = {
    # model: (total, active, active rounding, no_input_emb, source)
    "mixtral-8x7b": ("46.7B", "12.9B", "round", False,
                     "mistral.ai/news/mixtral-of-experts (Dec 2023)"),
    "mixtral-8x22b": ("141B", "39B", "round", False, "mistral.ai/news/mixtral-8x22b (Apr 2024)"),
    "deepseek-v3": ("671B", "37B", "round", True,
                    "arXiv:2412.19437 abstract; HF README: 671B main model + 14B MTP"),
    "qwen3-30b-a3b": ("30.5B", "3.3B", "trunc", False, "HF Qwen/Qwen3-30B-A3B model card"),
    "qwen3-235b-a22b": ("235B", "22B", "round", False, "HF Qwen/Qwen3-235B-A22B model card"),
    "qwen2-57b-a14b": ("57B", "14B", "round", False, "arXiv:2407.10671 Table 1"),
    # Active: a top-1 Switch model is FLOP-matched to its dense T5-Base (HF t5-base: 222.9M).
    "switch-base-128": ("7.4B", "0.223B", "round", False,
                        "arXiv:2101.03961 (Switch-Base-128: 7.4B); HF google-t5/t5-base"),
    "gpt-oss-120b": ("116.83B", "5.13B", "round", True, "gpt-oss model card, arXiv:2508.10925"),
    "glam-64e": ("1.2T", "96.6B", "round", False, "arXiv:2112.06905 Table 4"),
    "gpt4-rumoured-16x111b": ("1.8T", "0.28T", "round", False,  # "~280B active"
                              "RUMOUR: SemiAnalysis, July 2023 (not published by OpenAI)"),
}
_SCALE = {"M": 1e6, "B": 1e9, "T": 1e12}


def _figure(text: str) -> tuple[float, float]:
    """'46.7B' -> (46.7e9, 0.1e9): the value and one unit of its last printed digit."""
    number, scale = text[:-1], _SCALE[text[-1]]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(number) * scale, 10.0 ** -decimals * scale


def _agrees(count: int, text: str, rounding: str = "round") -> bool:
    value, unit = _figure(text)
    if abs(count - value) <= 0.01 * value:
        return True
    if rounding == "trunc":
        return value <= count < value + unit
    return abs(count - value) <= unit / 2


def test_figure_parsing_and_agreement_rule():
    assert _figure("46.7B") == (46.7e9, pytest.approx(0.1e9))
    assert _figure("1.2T") == (1.2e12, pytest.approx(0.1e12))
    assert _agrees(1_161_000_000_000, "1.2T")          # rounds to 1.2T
    assert not _agrees(1_149_000_000_000, "1.2T")      # rounds to 1.1T, and 4% off
    assert _agrees(3_353_000_000, "3.3B", "trunc")
    assert not _agrees(3_353_000_000, "3.3B", "round")  # 1.6% off and rounds to 3.4B


def test_list_models_is_the_shipped_set():
    assert set(list_models()) == SHIPPED
    assert set(PUBLISHED) == SHIPPED - {"tiny-cpu"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_figures(name):
    total_text, active_text, rounding, no_input_emb, _source = PUBLISHED[name]
    model = load_model(name)
    counts = model.param_counts()
    active = counts.active - (model.vocab_size * model.hidden_size if no_input_emb else 0)
    assert _agrees(counts.total, total_text), (name, counts.total)
    assert _agrees(active, active_text, rounding), (name, active)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_files_are_named_after_themselves_and_cite_a_source(name):
    model = load_model(name)
    assert model.name == name
    assert model.source and model.description
    assert find_model(name).stem == name


def test_rumoured_model_says_so_and_matches_the_rumoured_parts():
    model = load_model("gpt4-rumoured-16x111b")
    assert "RUMOUR" in model.description and "RUMOUR" in model.source
    counts = model.param_counts()
    per_expert = counts.routed_experts / model.num_experts  # one expert across all its layers
    assert abs(per_expert - 111e9) <= 0.02 * 111e9           # "~111B per expert"
    assert abs(counts.attention - 55e9) <= 0.01 * 55e9       # "~55B shared attention"
    assert model.num_layers == 120 and model.num_experts == 16 and model.top_k == 2


def test_tiny_cpu_counts_by_hand():
    h, layers, vocab, experts, top_k, ffn = 256, 4, 1000, 8, 2, 512
    heads, kv_heads, head_dim = 4, 2, 64
    embedding = 2 * vocab * h + h                 # untied input/output + final norm = 512,256
    attention = layers * (h * heads * head_dim                # q
                          + 2 * h * kv_heads * head_dim       # k, v
                          + heads * head_dim * h              # o
                          + 2 * h)                            # two norms per block
    expert = 3 * h * ffn                          # SwiGLU: gate, up, down = 393,216
    routed = layers * experts * expert
    router = layers * experts * h
    total = embedding + attention + routed + router
    active = embedding + attention + layers * top_k * expert + router
    assert (total, active) == (13_891_840, 4_454_656)
    counts = load_model("tiny-cpu").param_counts()
    assert (counts.embedding, counts.attention, counts.routed_experts, counts.router) == (
        embedding, attention, routed, router)
    assert (counts.total, counts.active) == (total, active)


def test_glam_gates_only_its_dense_ffns():
    glam = load_model("glam-64e")
    h, ffn, dense_blocks, moe_layers = 8192, 32768, 32, 32
    counts = glam.param_counts()
    assert glam.num_moe_layers == moe_layers
    assert counts.dense_ffn == dense_blocks * 3 * h * ffn           # GeGLU: two wi, one wo
    assert counts.routed_experts == moe_layers * 64 * 2 * h * ffn   # GELU: wi, wo
    ungated = load_model({"base": "glam-64e", "dense_activation": None})
    assert ungated.param_counts().dense_ffn == dense_blocks * 2 * h * ffn


def test_deepseek_v3_structure():
    model = load_model("deepseek-v3")
    assert model.moe_layer_ids == tuple(range(3, 61))
    a = model.attention
    # One MLA block by hand: q down/norm/up, kv down (+rope key)/norm/up, output, two norms.
    q = 7168 * 1536 + 1536 + 1536 * 128 * (128 + 64)
    kv = 7168 * (512 + 64) + 512 + 512 * 128 * (128 + 128)
    out = 128 * 128 * 7168
    assert a.kind == "mla" and model.attention_params == q + kv + out + 2 * 7168


# ---- loading ---------------------------------------------------------------------------------

def test_load_by_path_mapping_and_spec(tmp_path):
    shipped = find_model("tiny-cpu")
    by_name = load_model("tiny-cpu")
    assert load_model(str(shipped)) == by_name
    copy = tmp_path / "mine.yaml"
    copy.write_text(shipped.read_text(encoding="utf-8").replace("name: tiny-cpu\n", ""),
                    encoding="utf-8")
    mine = load_model("mine.yaml", relative_to=tmp_path)
    assert mine.name == "mine"  # a file without a name is named after itself
    assert mine.param_counts() == by_name.param_counts()
    inline = load_model({"name": "x", "hidden_size": 256, "num_layers": 4, "vocab_size": 1000,
                         "attention": {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2,
                                       "head_dim": 64},
                         "num_experts": 8, "top_k": 2, "expert_ffn_size": 512})
    assert inline.param_counts() == by_name.param_counts()
    assert load_model(by_name) is by_name


def test_base_overrides_replace_only_the_given_fields():
    base = load_model("mixtral-8x7b")
    small = load_model({"base": "mixtral-8x7b", "num_layers": 4,
                        "attention": {"num_kv_heads": 4}})
    assert small.num_layers == 4
    assert small.attention == AttentionSpec(kind="gqa", num_heads=32, num_kv_heads=4,
                                            head_dim=128)
    assert (small.hidden_size, small.num_experts, small.expert_ffn_size) == (4096, 8, 14336)
    assert small.name == "mixtral-8x7b-variant"
    # Routed-expert parameters scale with the layer count: 4 of 32 layers.
    assert small.param_counts().routed_experts * 8 == base.param_counts().routed_experts
    named = load_model({"base": "mixtral-8x7b", "name": "m4", "num_layers": 4})
    assert named.name == "m4"
    assert load_model({"base": "mixtral-8x7b"}) == base


def test_base_in_a_file_resolves_next_to_that_file(tmp_path):
    sub = tmp_path / "models"
    sub.mkdir()
    (sub / "parent.yaml").write_text("base: tiny-cpu\nnum_experts: 16\n", encoding="utf-8")
    (sub / "child.yaml").write_text("base: parent.yaml\ntop_k: 4\n", encoding="utf-8")
    child = load_model("models/child.yaml", relative_to=tmp_path)
    assert (child.num_experts, child.top_k, child.hidden_size) == (16, 4, 256)
    assert child.name == "child"


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"'base:' chain loops.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_model("a.yaml", relative_to=tmp_path)


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "pattern"), [
    ({"base": "tiny-cpu", "num_expert": 4},
     r"model\.num_expert: unknown field 'num_expert' \(allowed: name, hidden_size"),
    ({"base": "tiny-cpu", "hidden_size": "big"},
     r"model\.hidden_size: expected an integer, got str 'big'"),
    ({"base": "tiny-cpu", "attention": {"num_heads": 2.5}},
     r"model\.attention\.num_heads: expected an integer, got float 2\.5"),
    ({"base": "tiny-cpu", "activation": "tanh"},
     r"model\.activation: 'tanh' is not allowed \(allowed: 'swiglu'"),
    ({"base": "tiny-cpu", "top_k": 9}, r"model\.top_k: top_k=9 must be <= num_experts=8"),
    ({"base": "tiny-cpu", "num_experts": 0}, r"model\.num_experts: 0 must be >= 1"),
    ({"base": "nope"}, r"model\.base: unknown model 'nope' \(shipped: .*mixtral-8x7b"),
    ({"base": 3}, r"model\.base: expected a model name or \.yaml path, got int"),
    ({"hidden_size": 8}, r"model\.name: required field is missing"),
    (42, r"model: expected a model name, a \.yaml path or a mapping"),
])
def test_bad_models_name_the_field(model, pattern):
    with pytest.raises(ScenarioError, match=pattern):
        load_model(model, source="s.yaml")


def test_unknown_name_lists_the_shipped_models():
    with pytest.raises(ScenarioError, match=r"unknown model 'mixtral-8x8b'") as info:
        load_model("mixtral-8x8b", source="run.yaml")
    message = str(info.value)
    assert message.startswith("run.yaml: model: ")
    assert all(name in message for name in SHIPPED)


def test_missing_file_and_bad_file_name_the_file(tmp_path):
    with pytest.raises(ScenarioError, match=r"model file 'absent\.yaml' not found"):
        load_model("absent.yaml", relative_to=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny-cpu\ntop_k: 12\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"bad\.yaml: .*top_k=12 must be <= num_experts=8"):
        load_model(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"list\.yaml: a model file must be a YAML mapping"):
        load_model(str(listed))


def test_spec_checks_hold_for_direct_construction():
    with pytest.raises(ScenarioError, match=r"model\.dense_ffn_size"):
        ModelSpec(name="m", hidden_size=8, num_layers=2, vocab_size=10, num_experts=2, top_k=1,
                  expert_ffn_size=8, first_dense_layers=1)
    assert math.isclose(load_model("switch-base-128").capacity_factor or 0.0, 1.25)


def test_model_dirs_include_the_source_checkout():
    shipped = find_model("tiny-cpu")
    assert shipped.parent == Path(__file__).resolve().parent.parent / "scenarios" / "models"
