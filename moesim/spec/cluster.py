"""The cluster a scenario runs on: which hardware profile, how many nodes, and how they connect.

``topology`` picks a builder in :mod:`moesim.topology`:

- ``nvswitch``: one node, every device on one NVSwitch (scale-up links only);
- ``fat_tree``: nodes of ``devices_per_node`` devices on an NVSwitch each, one NIC per device, NICs on
  leaf switches of ``leaf_nodes`` nodes, leaves joined by a core whose uplinks carry
  1/``oversubscription`` of the leaf's downlink bandwidth;
- ``rail_optimized``: as fat_tree, but NIC i of every node sits on rail switch i (DGX SuperPOD style);
  cross-rail traffic first crosses NVLink to the GPU on the destination's rail (NCCL PXN);
- ``torus``: TPU-style chips on a 2D/3D torus of ICI links (``torus_dims``, ``wraparound``);
- ``explicit``: the devices and links listed in ``devices`` and ``links`` (heterogeneous allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moesim.errors import ScenarioError
from moesim.spec.fields import spec_field

__all__ = ["ClusterSpec", "ExplicitDevice", "ExplicitLink", "TOPOLOGIES"]

TOPOLOGIES = ("nvswitch", "fat_tree", "rail_optimized", "torus", "explicit")


@dataclass(frozen=True, kw_only=True)
class ExplicitDevice:
    name: str
    node: int = spec_field(0, min=0, doc="host index, for intra/inter-node accounting")
    hardware: str = spec_field("", path=True, doc="profile name/path; empty = the cluster's profile")


@dataclass(frozen=True, kw_only=True)
class ExplicitLink:
    a: str = spec_field(doc="device or switch name")
    b: str = spec_field(doc="device or switch name")
    bandwidth: float = spec_field(unit="bandwidth", gt=0, doc="per direction")
    latency: float = spec_field(0.0, unit="time", min=0)
    kind: str = "scale_out"
    bidirectional: bool = True


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Hardware profile + topology + sizes. Bandwidth overrides are for what-if sweeps."""

    hardware: str = spec_field(path=True, doc="shipped profile name (see `moesim info`) or a .yaml path")
    topology: Literal["nvswitch", "fat_tree", "rail_optimized", "torus", "explicit"] = "fat_tree"
    nodes: int = spec_field(1, min=1, max=1 << 20)
    devices_per_node: int = spec_field(0, min=0, max=1024, doc="0 = the profile's node.devices_per_node")
    oversubscription: float = spec_field(1.0, min=1.0, max=1000, doc="leaf downlink : uplink bandwidth")
    leaf_nodes: int = spec_field(16, min=1, max=1 << 20, doc="nodes per leaf switch (fat_tree)")
    torus_dims: tuple[int, ...] = ()
    wraparound: bool = True
    scale_up_bandwidth: float | None = spec_field(None, unit="bandwidth", gt=0,
                                                  doc="override the profile's NVLink/ICI figure")
    scale_out_bandwidth: float | None = spec_field(None, unit="bandwidth", gt=0,
                                                   doc="override the profile's NIC figure")
    devices: tuple[ExplicitDevice, ...] = ()
    links: tuple[ExplicitLink, ...] = ()

    def __post_init__(self) -> None:
        bad_dims = not 1 <= len(self.torus_dims) <= 3 or any(d < 1 for d in self.torus_dims)
        if self.topology == "torus" and bad_dims:
            raise ScenarioError(f"torus_dims={list(self.torus_dims)} must be 1 to 3 positive "
                                "sizes, e.g. [4, 4, 4]", field="cluster.torus_dims")
        if self.topology == "explicit" and not (self.devices and self.links):
            raise ScenarioError("an explicit topology needs `devices` and `links` lists",
                                field="cluster.topology")
        if self.topology == "nvswitch" and self.nodes != 1:
            raise ScenarioError(f"nodes={self.nodes}: an nvswitch topology is one node; use "
                                "fat_tree or rail_optimized for more", field="cluster.nodes")
