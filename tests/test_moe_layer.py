"""The real distributed MoE layer (calibrate/moe_layer.py) and the emulated cluster.

The layer is checked against a single-process reference that computes the same output with no
communication, and its recorded split sizes against counts derived by hand. The emulated
cluster needs root and iproute2: without them these tests fail with the install hint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calibrate import emulated_cluster as ec  # noqa: E402
from calibrate import moe_layer as ml  # noqa: E402

T = 24  # tokens per rank


def _expert_ids() -> list[list[list[int]]]:
    """Uneven routing: rank 0 favours experts {2, 0}, rank 1 favours {2, 3}."""
    rank0 = [[2, 0] if t % 3 else [1, 3] for t in range(T)]  # 16 x (2,0), 8 x (1,3)
    rank1 = [[2, 3] if t % 4 else [0, 1] for t in range(T)]  # 18 x (2,3), 6 x (0,1)
    return [rank0, rank1]


CONFIG = {"hidden": 32, "ffn": 48, "num_experts": 4, "top_k": 2, "tokens_per_rank": T,
          "dtype": "float32", "placement": [[0, 1, 2], [2, 3]],  # expert 2 on both ranks
          "routing": {"kind": "expert_ids", "expert_ids": _expert_ids()},
          "warmup": 1, "iters": 3, "seed": 7, "threads_per_rank": 1}


@pytest.fixture(scope="module")
def distributed_run():
    cfg = ml.load_config(CONFIG)
    report, outputs = ml.launch_local(cfg, nprocs=2, backend="gloo")
    return cfg, report, outputs


def test_distributed_layer_matches_single_process_reference(distributed_run):
    cfg, _, outputs = distributed_run
    reference = ml.reference_moe(cfg)
    for out, ref in zip(outputs, reference, strict=True):
        assert out.shape == (T, 32)
        assert ref.abs().mean() > 0.05  # the layer produced real numbers, not zeros
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_split_sizes_match_hand_counts_and_conserve_tokens(distributed_run):
    _, report, _ = distributed_run
    counts = [r["counts"] for r in report["ranks"]]
    # by hand: expert 2's rows alternate between its replicas, rank r starting on replica r
    # rank 0: e0 16, e1 8, e3 8, e2 16 -> 8 local + 8 to rank 1
    # rank 1: e0 6, e1 6, e3 18, e2 18 -> 9 to rank 0 + 9 local
    assert [c["send_rows"] for c in counts] == [[32, 16], [21, 27]]
    assert [c["expert_rows"] for c in counts] == [[22, 14, 17], [17, 26]]
    for i in range(2):
        for j in range(2):
            assert counts[i]["send_rows"][j] == counts[j]["recv_rows"][i]
        assert counts[i]["returned_rows"] == T * 2
        assert sum(counts[i]["expert_rows"]) == sum(counts[i]["recv_rows"])


def test_report_step_time_is_the_slowest_rank_per_iteration(distributed_run):
    _, report, _ = distributed_run
    per_iter = report["step_max_total_per_iter_s"]
    assert len(per_iter) == 3
    for i, step in enumerate(per_iter):
        assert step == max(r["totals_s"][i] for r in report["ranks"])
    for r in report["ranks"]:
        phases = r["phases_s"]
        assert set(phases) == set(ml.PHASES)
        assert all(0 < phases[p]["p10"] <= phases[p]["median"] <= phases[p]["p90"]
                   for p in ml.PHASES)


def test_reference_equals_naive_per_token_loop():
    cfg = ml.load_config(CONFIG | {"routing": None})  # router's own top-k
    out = ml.reference_moe(cfg, ranks=[1])[0]
    x = ml._tokens(cfg, 1)
    probs = F.softmax(x @ ml._router_weight(cfg).t(), dim=-1)
    experts = [ml._expert_weights(cfg, e) for e in range(4)]
    for t in range(T):
        top = probs[t].topk(2)
        y = sum(p / top.values.sum() * ml._swiglu(x[t:t + 1], experts[int(e)])[0]
                for p, e in zip(top.values, top.indices, strict=True))
        assert torch.allclose(out[t], y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("change", "match"), [
    ({"hiden": 3}, "unknown keys"),
    ({"placement": [[0, 1], [1, 2]]}, r"experts \[3\] are on no rank"),
    ({"placement": [[0, 0], [1, 2, 3]]}, "holds an expert twice"),
    ({"routing": {"kind": "expert_ids", "expert_ids": [[[0, 1]]]}}, "has shape"),
    ({"routing": {"kind": "zipf"}}, "allowed: 'expert_ids', 'sampled'"),
    ({"dtype": "int8"}, "dtype='int8'"),
])
def test_bad_config_is_rejected(change, match):
    with pytest.raises(ml.LayerConfigError, match=match):
        ml.load_config(CONFIG | change)


# ---- emulated cluster ----

ALL_REDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print(t.item(), os.environ["MOESIM_NODE_ID"], os.readlink("/proc/self/ns/net"))
dist.destroy_process_group()
"""


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _assert_cleaned(cluster: ec.EmulatedCluster) -> None:
    netns, links = _ip("netns", "list"), _ip("link")
    assert not any(ns in netns for ns in cluster.namespaces)
    assert cluster.bridge not in links and not any(v in links for v in cluster.outer)


def test_emulated_cluster_runs_all_reduce_across_namespaces_and_cleans_up():
    cluster = ec.EmulatedCluster(nodes=2, ranks_per_node=1, rate="400mbit")
    with cluster:
        assert all(ns in _ip("netns", "list") for ns in cluster.namespaces)
        assert cluster.bridge in _ip("link")
        qdisc = _ip("netns", "exec", cluster.namespaces[1], "tc", "qdisc", "show",
                    "dev", cluster.inner[1])
        assert "tbf" in qdisc and "rate 400Mbit" in qdisc
        results = cluster.run([sys.executable, "-c", ALL_REDUCE], timeout=60)
    _assert_cleaned(cluster)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-300:] for r in results]
    lines = [r.stdout.split() for r in results]
    assert [ln[:2] for ln in lines] == [["3.0", "0"], ["3.0", "1"]]
    own_ns = os.readlink("/proc/self/ns/net")
    assert len({lines[0][2], lines[1][2], own_ns}) == 3  # each rank in its own namespace


def test_emulated_cluster_kills_survivors_of_a_failed_rank():
    stuck = 'if [ "$RANK" = 1 ]; then exit 3; fi; sleep 60'
    with ec.EmulatedCluster(nodes=2, rate=None) as cluster:
        results = cluster.run(["sh", "-c", stuck], timeout=30)
        with pytest.raises(ec.EmulatedClusterError, match="did not finish within 0.5 s"):
            cluster.run(["sleep", "30"], timeout=0.5)
    _assert_cleaned(cluster)
    assert [r.returncode for r in results] == [-9, 3]


def test_missing_iproute2_names_the_package(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(ec.shutil, "which", lambda n: None if n == "tc" else real_which(n))
    with pytest.raises(ec.EmulatedClusterError, match=r"\['tc'\].*apt-get install -y iproute2"):
        ec.EmulatedCluster(nodes=2).start()
