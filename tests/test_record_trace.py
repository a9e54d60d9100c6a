"""Tests for calibrate/record_routing_trace.py: a tiny real run, the metrics, the shipped trace."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "scenarios" / "traces" / "stdlib-moe-32e-top4.npz"


def _load_recorder():
    spec = importlib.util.spec_from_file_location(
        "record_routing_trace", ROOT / "calibrate" / "record_routing_trace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


rt = _load_recorder()
TINY = rt.TraceConfig(layers=2, hidden=32, heads=2, num_experts=8, top_k=2, expert_ffn=32,
                      seq_len=32, batch=8, steps=40, lr=1e-2, tokens_per_domain=256, seed=3,
                      threads=1)  # tiny matmuls gain nothing from threads; robust on busy cores


@pytest.fixture(scope="module")
def corpus():
    return rt.collect_corpus()


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    path = rt.save_trace(tmp_path_factory.mktemp("trace") / "tiny.npz",
                         rt.record_trace(TINY, corpus))
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_corpus_split_on_a_hand_made_stdlib(tmp_path):
    files = ["a/__init__.py", "a/x.py", "a/y.py", "a/z.py", "b/__init__.py", "b/m.py",
             "other.py", "a/test/t.py", "site-packages/s.py", "notes.txt"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    c = rt.collect_corpus(tmp_path, (("A", ("a",)), ("B", ("b",))))
    # Sorted domain files: index 1 is held out; tests, site-packages and non-.py are skipped.
    assert [h.tobytes() for h in c.heldout] == [b"a/x.py\n", b"b/m.py\n"]
    assert c.train.tobytes() == b"a/__init__.py\na/y.py\na/z.py\nb/__init__.py\nother.py\n"
    assert (c.train_files, c.heldout_files) == (5, (1, 1))
    with pytest.raises(rt.TraceRecordError, match=r"no held-out files for domains \['C'\]"):
        rt.collect_corpus(tmp_path, (("A", ("a",)), ("C", ("other",))))


def test_real_heldout_text_is_not_in_the_training_text(corpus):
    assert len(corpus.heldout) == len(rt.DOMAINS) and all(n > 0 for n in corpus.heldout_files)
    train = corpus.train.tobytes()
    for (name, _), text in zip(rt.DOMAINS, corpus.heldout, strict=True):
        starts = np.linspace(0, text.size - 200, 50).astype(int)
        seen = sum(text[s:s + 200].tobytes() in train for s in starts)
        if name == "tables":
            # Codec tables are near-copies of each other (documented): held out by file only.
            assert seen >= 10
        else:
            # Stdlib modules share a little boilerplate; a leak would repeat most windows.
            assert seen <= 3, name


def test_tiny_run_writes_the_documented_arrays(tiny_run):
    ids, dom = tiny_run["expert_ids"], tiny_run["domain"]
    tokens = TINY.tokens_per_domain * len(rt.DOMAINS)
    assert ids.dtype == np.int16 and ids.shape == (TINY.layers, tokens, TINY.top_k)
    assert dom.dtype == np.int16 and dom.shape == (tokens,)
    assert int(tiny_run["num_experts"]) == TINY.num_experts
    assert list(tiny_run["domains"]) == [name for name, _ in rt.DOMAINS]
    # Domains are recorded in order, tokens_per_domain each.
    np.testing.assert_array_equal(dom, np.repeat(np.arange(len(rt.DOMAINS)),
                                                 TINY.tokens_per_domain))
    assert ids.min() >= 0 and ids.max() < TINY.num_experts
    # No token picks an expert twice within its top-k.
    srt = np.sort(ids, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all()
    for key in ("hidden", "layers", "top_k", "steps", "seed", "train_loss_final",
                "train_loss_initial", "torch_version", "date", "heldout_loss"):
        assert key in tiny_run
    assert int(tiny_run["steps"]) == TINY.steps and int(tiny_run["seed"]) == TINY.seed


def test_tiny_run_training_lowers_the_loss(tiny_run):
    loss = tiny_run["train_loss"]
    assert loss.shape == (TINY.steps,)
    # Step 0 is near the uniform-byte loss ln 256; training must clearly beat it.
    assert abs(loss[0] - np.log(256)) < 0.5
    assert float(tiny_run["train_loss_final"]) < loss[0] - 1.0
    # Held-out text (never trained on) gets easier too, in every domain.
    assert (tiny_run["heldout_loss"] < tiny_run["heldout_loss_untrained"] - 0.5).all()


def test_same_seed_gives_the_same_trace(corpus):
    cfg = dataclasses.replace(TINY, steps=5)
    a, b = rt.record_trace(cfg, corpus), rt.record_trace(cfg, corpus)
    np.testing.assert_array_equal(a["expert_ids"], b["expert_ids"])
    np.testing.assert_array_equal(a["train_loss"], b["train_loss"])


def test_summarize_matches_hand_counts():
    # One layer, 4 experts, top-2, 4 tokens; domain 0 = tokens 0-1, domain 1 = tokens 2-3.
    ids = np.array([[[0, 1], [1, 0], [2, 3], [0, 2]]], dtype=np.int16)
    s = rt.summarize(ids, 4, np.array([0, 0, 1, 1]))
    # Loads: e0=3, e1=2, e2=2, e3=1 -> max/mean = 3 / 2.
    assert s["max_over_mean"][0] == pytest.approx(1.5)
    # Domain 0: (2,2,0,0) -> 2 / 1; domain 1: (1,0,2,1) -> 2 / 1; mean 2.
    assert s["domain_max_over_mean"][0] == pytest.approx(2.0)
    # Normalised: domain 0 (.5,.5,0,0), domain 1 (.25,0,.5,.25): L1 = .25+.5+.5+.25.
    assert s["drift_l1"][0] == pytest.approx(1.5)
    np.testing.assert_allclose(s["domain_l1"][0], [[0, 1.5], [1.5, 0]])
    # Halves of domain 0 are {0,1} and {1,0}: identical loads.
    assert s["noise_l1"][0] == pytest.approx(0.0)
    # Pair (0,1) on 2 of 4 tokens; p0 = 3/4, p1 = 1/2 -> expected 4 * 3/8 = 1.5, lift 2/1.5.
    assert s["top_pair"][0].tolist() == [0, 1]
    assert s["top_pair_lift"][0] == pytest.approx(2 / 1.5)


def test_config_rejects_top_k_above_experts():
    with pytest.raises(rt.TraceRecordError, match="top_k=5 must be <= num_experts=4"):
        rt.TraceConfig(num_experts=4, top_k=5)


def test_shipped_trace_has_documented_shape_and_metadata():
    with np.load(SHIPPED) as f:
        ids, dom, names = f["expert_ids"], f["domain"], f["domains"]
        e, k, layers = int(f["num_experts"]), int(f["top_k"]), int(f["layers"])
        assert (e, k, layers) == (32, 4, 4)
        assert ids.dtype == np.int16 and ids.shape == (layers, dom.size, k)
        assert dom.dtype == np.int16 and set(np.unique(dom)) == set(range(len(names)))
        assert ids.min() >= 0 and ids.max() < e
        assert (np.diff(np.sort(ids, axis=-1), axis=-1) > 0).all()
        assert float(f["train_loss_final"]) < float(f["train_loss_initial"]) - 2.0
        assert str(f["torch_version"]) and str(f["date"])
    assert SHIPPED.stat().st_size < 2_000_000
