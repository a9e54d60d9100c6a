"""The pricing context: everything besides routing and placement that prices a scenario's step.

Built once per scenario (and per topology: a faulted run prices on its damaged topology) by
:meth:`PricingContext.from_scenario`. The simulator prices the representative EP group (stage 0,
group 0) with it, the planner scores candidate placements with it, so the two agree on what a
placement costs by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from moesim.calibration import MeasuredTables
from moesim.compute import KernelTimer
from moesim.errors import ScenarioError, TopologyError
from moesim.layout import Layout
from moesim.memory import (
    group_tokens_per_microbatch,
    routed_tokens_per_microbatch,
    share_tokens_per_microbatch,
    tokens_per_microbatch,
)
from moesim.spec.hardware import LinkSpec, dtype_bytes, load_hardware
from moesim.spec.scenario import Scenario, tokens_per_sequence
from moesim.topology import Topology, build_topology

__all__ = ["PricingContext", "scenario_topology", "kernel_timer", "estimate_memory",
           "check_memory_budget"]


def scenario_topology(s: Scenario) -> Topology:
    """The scenario's topology; topology errors are reported against the scenario file."""
    base = Path(s.source).parent if s.source else None
    try:
        profiles = {d.hardware: load_hardware(d.hardware, relative_to=base)
                    for d in s.cluster.devices if d.hardware}
        return build_topology(s.cluster, s.hardware, profiles)
    except TopologyError as exc:
        raise TopologyError(f"{s.source or s.name}: cluster: {exc}") from None


def kernel_timer(s: Scenario) -> KernelTimer:
    """Kernel times of the scenario's model on its device, from measured tables when the
    profile has them."""
    tables = MeasuredTables.from_profile(s.hardware) if s.hardware.calibration else None
    algorithm = s.communication.alltoall
    moe_kernel = ("moe" if not algorithm.startswith("deepep") else
                  "moe_deepep_decode" if s.workload.mode == "decode" else "moe_deepep_prefill")
    return KernelTimer(s.model, s.hardware.device, s.precision.compute, s.precision.weights,
                       s.precision.activations, s.parallelism.tp, tables,
                       inference=s.workload.mode != "training", kv_dtype=s.precision.kv_cache,
                       moe_kernel=moe_kernel, fp8_block=s.precision.fp8_scaling == "block",
                       etp=s.parallelism.etp)


@dataclass(frozen=True, eq=False)
class PricingContext:
    """What prices one EP group's step: built once per scenario and topology.

    ``tokens_per_source`` is each device's real tokens per micro-batch as the MoE layer sees
    them, ``group_tokens`` the TP group's as its tensor-parallel parts see them; both halved
    under two-batch overlap, whose halves run separately.
    """

    scenario: Scenario
    topology: Topology
    layout: Layout
    timer: KernelTimer
    group: np.ndarray                 # int[ep] global ranks of the representative EP group
    microbatch_tokens: float          # tokens per device per micro-batch (1/tp of its TP
                                      # group's under sequence parallelism)
    half_batch: bool                  # two-batch overlap: each half priced separately
    rtol: float                       # flow solver's event-merging tolerance

    @classmethod
    def from_scenario(cls, s: Scenario, topology: Topology | None = None) -> PricingContext:
        """The context of ``s`` on ``topology`` (default: the scenario's healthy topology);
        refuses a scenario over its memory budget (:func:`check_memory_budget`)."""
        check_memory_budget(s)
        layout = Layout.for_scenario(s)
        return cls(s, scenario_topology(s) if topology is None else topology, layout,
                   kernel_timer(s), layout.ep_group(0, 0), float(tokens_per_microbatch(s)),
                   s.communication.overlap == "two_batch", s.simulation.network_rtol)

    # --- what the group routes -----------------------------------------------------------
    @property
    def group_microbatch_tokens(self) -> float:
        """Tokens of this device's tensor-parallel group per micro-batch: what the TP-split
        parts (attention, dense FFN, shared experts, embedding, LM head) run on, each rank its
        slice of the weights or heads. Under sequence parallelism each rank holds ``1 / tp``
        of them between those parts (``microbatch_tokens``) and gathers them for each part."""
        return group_tokens_per_microbatch(self.scenario)

    def _per_half(self, tokens: float) -> float:
        """``tokens`` per micro-batch as one run prices them: halved under two-batch overlap,
        whose halves run separately."""
        return tokens / 2 if self.half_batch else tokens

    @property
    def group_tokens(self) -> float:
        """:attr:`group_microbatch_tokens` per (half) micro-batch: halved under two-batch
        overlap, whose halves run separately."""
        return self._per_half(self.group_microbatch_tokens)

    @property
    def share_tokens(self) -> float:
        """This device's ``1 / tp`` share of its TP group's tokens per (half) micro-batch: the
        tokens whose activations it saves (:func:`moesim.memory.share_tokens_per_microbatch`)."""
        return self._per_half(share_tokens_per_microbatch(self.scenario))

    @property
    def held_tokens(self) -> float:
        """Tokens this device holds per (half) micro-batch between the TP-split parts (the
        router, norms and residual adds run on them): ``1 / tp`` of its group's under
        sequence parallelism, else all of them, replicated over the group."""
        return self._per_half(self.microbatch_tokens)

    @property
    def tokens_per_source(self) -> float:
        """Real tokens each device routes into the MoE layer per (half) micro-batch: its
        ``1 / tp`` share of the TP group's tokens, so a token is routed once by its group
        (Megatron-Core routes each rank's sequence-parallel shard; serving engines running
        attention under TP hand each rank a share of the replicated tokens), or, under expert
        tensor parallelism, its ``etp`` ranks' shares, which each of them runs through its
        ``1 / etp`` slice of the experts (Megatron-Core gathers them over the expert-TP group;
        :func:`moesim.memory.routed_tokens_per_microbatch`)."""
        return self._per_half(routed_tokens_per_microbatch(self.scenario))

    @property
    def ep(self) -> int:
        return int(self.group.size)

    @cached_property
    def device_node(self) -> np.ndarray:
        """int[ep] node of each device of the group."""
        return self.topology.device_node[self.group]

    @property
    def hidden(self) -> int:
        return self.scenario.model.hidden_size

    @property
    def top_k(self) -> int:
        return self.scenario.model.effective_top_k

    @property
    def algorithm(self) -> str:
        return self.scenario.communication.alltoall

    @property
    def max_tokens_per_source(self) -> int:
        return self.scenario.routing.max_tokens_per_source

    @property
    def dispatch_bytes_per_elem(self) -> float:
        return dtype_bytes(self.scenario.precision.dispatch)

    @property
    def combine_bytes_per_elem(self) -> float:
        return dtype_bytes(self.scenario.precision.combine)

    @property
    def activation_bytes(self) -> float:
        return dtype_bytes(self.scenario.precision.activations)

    # --- the group's paths, looked up once ---------------------------------------------------
    @cached_property
    def group_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR paths between every ordered pair of the group's devices: pair ``(i, j)`` of local
        indices is path ``i * ep + j``."""
        src, dst = np.divmod(np.arange(self.ep ** 2), self.ep)
        return self.topology.paths_csr(np.stack([self.group[src], self.group[dst]], axis=1))

    @cached_property
    def padded_paths(self) -> tuple[np.ndarray, np.ndarray]:
        """The group's paths for the closed form: ``links: int[ep * ep, H]`` (row ``i * ep + j``,
        padded with -1) and ``latency: float[ep * ep]`` (each path's summed latency)."""
        ep = self.ep
        ptr, links = self.group_paths
        hops = np.diff(ptr)
        padded = np.full((ep * ep, max(int(hops.max(initial=0)), 1)), -1, dtype=np.int64)
        column = np.arange(links.size) - np.repeat(ptr[:-1], hops)
        padded[np.repeat(np.arange(ep * ep), hops), column] = links
        latency = np.bincount(np.repeat(np.arange(ep * ep), hops),
                              weights=self.topology.latency[links], minlength=ep * ep)
        return padded, latency

    def paths_csr(self, local_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paths of ``local_pairs: int[F, 2]`` (group-local indices) as CSR ``(ptr, links)``."""
        all_ptr, all_links = self.group_paths
        rows = local_pairs[:, 0] * self.ep + local_pairs[:, 1]
        first = all_ptr[rows]
        lengths = all_ptr[rows + 1] - first
        ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        return ptr, all_links[np.repeat(first - ptr[:-1], lengths) + np.arange(ptr[-1])]

    @cached_property
    def reverse_link(self) -> np.ndarray:
        """int[L]: index of each topology link's opposite direction, -1 where there is none."""
        index = {ends: i for i, ends in enumerate(self.topology.link_ends)}
        return np.array([index.get((v, u), -1) for u, v in self.topology.link_ends],
                        dtype=np.int64)

    @cached_property
    def link_specs(self) -> list[LinkSpec | None]:
        """Per topology link: its profile link class (``fabric`` switch links as ``scale_out``;
        None for a class the profile does not describe)."""
        return self.topology.profile_links(self.scenario.hardware)

    @cached_property
    def link_curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Per topology link: the message size at which its class reaches half its large-message
        efficiency (bytes; 0 = no size dependence) and its per-collective fixed cost (seconds),
        from the profile's link classes (``fabric`` switch links as ``scale_out``)."""
        half = np.zeros(self.topology.num_links)
        overhead = np.zeros(self.topology.num_links)
        for i, spec in enumerate(self.link_specs):
            if spec is not None:
                half[i], overhead[i] = spec.half_efficiency_size, spec.collective_overhead
        return half, overhead

    def context_length(self) -> tuple[float, float]:
        """(average attended context per token, KV tokens read per device) for the workload."""
        s = self.scenario
        wl = s.workload
        if wl.mode == "decode":
            # Each sequence's 1 + k query tokens (its next token and k drafts to verify) sit at
            # positions context_len + 1 ... + 1 + k; its KV cache is read once for all of them.
            per_seq = tokens_per_sequence(s)
            ctx = wl.context_len + (1 + per_seq) / 2
            return ctx, self.tokens_per_source / per_seq * (wl.context_len + per_seq)
        return wl.seq_len / 2, 0.0


def estimate_memory(s: Scenario) -> float:
    """Bytes the largest arrays of pricing ``s`` take, before doing it: each MoE layer's replica
    split holds a float per (node of the EP group, expert, device of the group), in about four
    arrays at once (:meth:`moesim.placement.placement.Placement.replica_split`), so it grows as
    ep^3; at 2,048 devices with 4,096 experts that is ~64 GiB."""
    ep = s.parallelism.ep
    nodes = -(-ep // s.devices_per_node)
    experts = s.model.num_experts + s.placement.redundant_experts
    return 4 * 8.0 * nodes * experts * ep


def check_memory_budget(s: Scenario) -> None:
    """Refuse ``s`` when :func:`estimate_memory` exceeds ``simulation.max_memory``: one line
    naming the field, before any work (the simulator, the planner and the search all price
    through :class:`PricingContext`)."""
    need = estimate_memory(s)
    if need > s.simulation.max_memory:
        raise ScenarioError(
            f"pricing this scenario would need about {need / 2**30:,.0f} GiB of memory (the "
            f"replica split of each MoE layer grows as ep^3; ep={s.parallelism.ep}), more than "
            f"simulation.max_memory={s.simulation.max_memory / 2**30:g} GiB; lower ep, price "
            "the all-to-all alone with `moesim collective`, or raise the limit",
            source=s.source, field="simulation")
