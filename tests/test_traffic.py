"""Dispatch traffic by hand: direct copies per expert, hierarchical copies per node."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import routing
from moesim.placement.placement import Placement
from moesim.traffic import layer_traffic


def _traffic(placement, choices, device_node, algorithm):
    return layer_traffic(choices, placement, 0, device_node=np.asarray(device_node),
                         tokens_per_source=choices.num_tokens, hidden=10,
                         dispatch_bytes_per_elem=2, combine_bytes_per_elem=4,
                         capacity_factor=None, top_k=choices.top_k, algorithm=algorithm)


def _choices(rows, source=None):
    rows = np.asarray(rows, dtype=np.int32)
    source = np.zeros(len(rows), dtype=np.int32) if source is None else np.asarray(source)
    return routing.LayerChoices(rows, source.astype(np.int32), 1.0)


def test_hierarchical_sends_one_network_copy_per_remote_node():
    # Devices 0,1 on node 0; 2,3 on node 1; expert i on device i. Source 0 sends 3 tokens, each
    # to experts 2 and 3 (both on node 1). Direct: 6 copies cross; hierarchical: 3 cross (to the
    # relay, device 2 = local index 0 of node 1), then device 2 forwards 3 copies to device 3.
    placement = Placement(np.arange(4).reshape(1, 4, 1), 4)
    choices = _choices([[2, 3]] * 3)
    token = 10 * 2
    direct = _traffic(placement, choices, [0, 0, 1, 1], "direct")
    hier = _traffic(placement, choices, [0, 0, 1, 1], "hierarchical")
    assert direct.cross_node_dispatch_bytes == 6 * token
    assert hier.cross_node_dispatch_bytes == 3 * token
    flows = {tuple(p): b for p, b in zip(hier.pairs.tolist(), hier.dispatch_bytes, strict=True)}
    assert flows == {(0, 2): 3 * token, (2, 3): 3 * token}
    assert hier.combine_bytes.sum() == 2 * hier.dispatch_bytes.sum()   # fp32 combine


def test_replicas_on_two_remote_nodes_each_get_their_network_copies():
    # Three one-device nodes; expert 0 has replicas on nodes 1 and 2 (even split). Four tokens of
    # source 0 choose expert 0: two copies cross to node 1 and two to node 2 (four in all), none
    # appears on a node without having crossed the network.
    placement = Placement(np.array([[[1], [0], [0]]]), 2)
    hier = _traffic(placement, _choices([[0]] * 4), [0, 1, 2], "hierarchical")
    token = 10 * 2
    flows = {tuple(p): b for p, b in zip(hier.pairs.tolist(), hier.dispatch_bytes, strict=True)}
    assert flows == {(0, 1): pytest.approx(2 * token), (0, 2): pytest.approx(2 * token)}
    assert hier.cross_node_dispatch_bytes == pytest.approx(4 * token)


def test_direct_bytes_are_token_copies_times_hidden_times_dtype():
    placement = Placement(np.arange(4).reshape(1, 4, 1), 4)
    choices = _choices([[1, 2], [3, 0]], source=[0, 1])
    tr = _traffic(placement, choices, [0, 0, 1, 1], "direct")
    flows = {tuple(p): b for p, b in zip(tr.pairs.tolist(), tr.dispatch_bytes, strict=True)}
    # source 0 -> devices 1, 2; source 1 -> devices 3, 0 (one copy each, 20 bytes).
    assert flows == {(0, 1): 20, (0, 2): 20, (1, 3): 20, (1, 0): 20}
