"""Simple expert placements that EPLB and the planner are measured against.

Each layer has ``E`` logical experts and ``P >= E`` physical slots, ``P / D`` on each of ``D``
devices; slot ``s`` lives on device ``s // (P / D)``. A placement is ``physical_to_logical:
int64 [layers, P]``, the logical expert held by each slot. Every expert holds at least one slot.
The ``P - E`` redundant slots hold extra replicas: of the hottest experts when a load is given
(the same greedy as EPLB, largest ``load / replica_count`` first), else of experts 0, 1, ... in
order. A replica goes to the lowest free slot on a device that does not already hold its expert
(a second copy on the same device would balance nothing), else to the lowest free slot.

A device's load is the sum over its slots of ``load[expert] / replica_count[expert]``: tokens
are assumed to split evenly over an expert's replicas (``device_loads``).
"""

from __future__ import annotations

import numpy as np

from moesim.errors import InfeasiblePlacement
from moesim.placement.eplb import replicate_experts

__all__ = ["contiguous", "round_robin", "random_placement", "device_loads"]


def _check_sizes(
    num_layers: int, num_experts: int, num_devices: int, num_physical: int, load: object
) -> np.ndarray | None:
    """Validate the sizes; return ``load`` as float64 [layers, experts] or None."""
    if num_layers < 1 or num_experts < 1 or num_devices < 1:
        raise InfeasiblePlacement(
            f"num_layers={num_layers}, num_experts={num_experts} and num_devices={num_devices} "
            "must all be >= 1"
        )
    if num_physical < num_experts or num_physical % num_devices != 0:
        raise InfeasiblePlacement(
            f"num_physical={num_physical} must be >= num_experts={num_experts} and a multiple "
            f"of num_devices={num_devices}"
        )
    if load is None:
        return None
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (num_layers, num_experts):
        raise InfeasiblePlacement(
            f"load has shape {load.shape}, expected (num_layers, num_experts) = "
            f"({num_layers}, {num_experts})"
        )
    if not np.all(np.isfinite(load)) or np.any(load < 0):
        raise InfeasiblePlacement("load must be finite and >= 0")
    return load


def _redundant_experts(
    num_layers: int, num_experts: int, num_physical: int, load: np.ndarray | None
) -> np.ndarray:
    """Experts that get the redundant slots, in the order they get them: int64 [layers, P - E]."""
    if load is not None:
        return replicate_experts(load, num_physical)[0][:, num_experts:]
    in_order = np.arange(num_physical - num_experts, dtype=np.int64) % num_experts
    return np.broadcast_to(in_order, (num_layers, num_physical - num_experts)).copy()


def _place(
    device_of_expert: np.ndarray, num_devices: int, num_physical: int, redundant: np.ndarray
) -> np.ndarray:
    """Fill slots: each device's experts in id order first, then the redundant replicas.

    ``device_of_expert: [E]`` (same for every layer); ``redundant: [layers, P - E]``.
    """
    slots_per_device = num_physical // num_devices
    num_layers = redundant.shape[0]
    placement = np.full((num_layers, num_physical), -1, dtype=np.int64)
    # 1. Originals: device d's experts fill its first slots, lowest id first.
    used = np.zeros(num_devices, dtype=np.int64)
    for expert, device in enumerate(device_of_expert):
        assert used[device] < slots_per_device, (expert, device)
        placement[:, device * slots_per_device + used[device]] = expert
        used[device] += 1
    # 2. Replicas: lowest free slot on a device without that expert, else lowest free slot.
    for layer in range(num_layers):
        for expert in redundant[layer]:
            free = np.flatnonzero(placement[layer] == -1)
            holders = placement[layer].reshape(num_devices, slots_per_device) == expert
            elsewhere = free[~holders.any(axis=1)[free // slots_per_device]]
            placement[layer, elsewhere[0] if elsewhere.size else free[0]] = expert
    assert (placement >= 0).all()
    return placement


def contiguous(
    num_layers: int,
    num_experts: int,
    num_devices: int,
    num_physical: int,
    *,
    load: np.ndarray | None = None,
) -> np.ndarray:
    """Expert ``i`` on device ``i // ceil(E / D)``: blocks of consecutive experts per device.

    Parameters
    ----------
    num_layers, num_experts, num_devices : int
        Sizes, all >= 1.
    num_physical : int
        Slots per layer ``P``; a multiple of ``num_devices`` and ``>= num_experts``.
    load : float [layers, experts], optional
        Expert loads; when given, the redundant slots replicate the hottest experts.

    Returns
    -------
    physical_to_logical : int64 [layers, num_physical]

    Raises
    ------
    InfeasiblePlacement
        If the sizes or the load shape do not fit.
    """
    load = _check_sizes(num_layers, num_experts, num_devices, num_physical, load)
    experts_per_device = -(-num_experts // num_devices)  # ceil; <= P / D because P >= E
    device_of_expert = np.arange(num_experts) // experts_per_device
    redundant = _redundant_experts(num_layers, num_experts, num_physical, load)
    return _place(device_of_expert, num_devices, num_physical, redundant)


def round_robin(
    num_layers: int,
    num_experts: int,
    num_devices: int,
    num_physical: int,
    *,
    load: np.ndarray | None = None,
) -> np.ndarray:
    """Expert ``i`` on device ``i % D``; arguments, result and errors as :func:`contiguous`."""
    load = _check_sizes(num_layers, num_experts, num_devices, num_physical, load)
    device_of_expert = np.arange(num_experts) % num_devices
    redundant = _redundant_experts(num_layers, num_experts, num_physical, load)
    return _place(device_of_expert, num_devices, num_physical, redundant)


def random_placement(
    num_layers: int,
    num_experts: int,
    num_devices: int,
    num_physical: int,
    seed: int,
    *,
    load: np.ndarray | None = None,
) -> np.ndarray:
    """Each layer's slots hold a uniformly random permutation of its experts and replicas.

    The replicated experts are chosen as in :func:`contiguous`; only their slots are random, so a
    replica may share a device with its original. The same ``seed`` gives the same placement.
    Other arguments, result and errors as :func:`contiguous`.
    """
    load = _check_sizes(num_layers, num_experts, num_devices, num_physical, load)
    redundant = _redundant_experts(num_layers, num_experts, num_physical, load)
    rng = np.random.default_rng(seed)
    placement = np.empty((num_layers, num_physical), dtype=np.int64)
    for layer in range(num_layers):
        contents = np.concatenate([np.arange(num_experts, dtype=np.int64), redundant[layer]])
        placement[layer] = rng.permutation(contents)
    return placement


def device_loads(
    load: np.ndarray, physical_to_logical: np.ndarray, num_devices: int
) -> np.ndarray:
    """Load on each device when every expert's load splits evenly over its replicas.

    Parameters
    ----------
    load : float [layers, experts]
    physical_to_logical : int [layers, P]
        A placement; slot ``s`` on device ``s // (P / num_devices)``; every expert has a slot.
    num_devices : int
        Must divide ``P``.

    Returns
    -------
    float64 [layers, num_devices]
    """
    load = np.asarray(load, dtype=np.float64)
    num_layers, num_experts = load.shape
    num_physical = physical_to_logical.shape[1]
    if num_physical % num_devices != 0:
        raise InfeasiblePlacement(
            f"num_devices={num_devices} must divide the {num_physical} slots per layer"
        )
    if physical_to_logical.min() < 0 or physical_to_logical.max() >= num_experts:
        raise InfeasiblePlacement(f"placement holds expert ids outside 0..{num_experts - 1}")
    replica_count = np.stack(
        [np.bincount(row, minlength=num_experts) for row in physical_to_logical]
    )
    if (replica_count == 0).any():
        layer, expert = np.argwhere(replica_count == 0)[0]
        raise InfeasiblePlacement(f"expert {expert} of layer {layer} holds no slot")
    layers = np.arange(num_layers)[:, None]
    slot_load = load[layers, physical_to_logical] / replica_count[layers, physical_to_logical]
    return slot_load.reshape(num_layers, num_devices, -1).sum(axis=-1)
