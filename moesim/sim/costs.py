"""The engine's view of a scenario's costs: every block of the representative EP group, priced once.

All micro-batches of a step reuse their block's routing sample (the expected load of that layer),
so :class:`CostModel` draws the routing once (node-limited by the placement when the scenario asks),
prices each block with :func:`moesim.pricing.block.block_cost` on first use and caches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from moesim import routing, routing_draw
from moesim.placement.placement import Placement
from moesim.pricing.block import BlockCost, block_cost
from moesim.pricing.context import PricingContext
from moesim.sim.faults import DeviceFaults

__all__ = ["CostModel"]


@dataclass
class CostModel:
    """Per-block costs of a scenario for one placement, computed lazily and cached."""

    ctx: PricingContext
    placement: Placement
    device_faults: DeviceFaults | None = None
    _cache: dict[int, BlockCost] = field(default_factory=dict)

    @property
    def scenario(self):  # noqa: ANN201 - the context's scenario
        return self.ctx.scenario

    @property
    def tokens(self) -> float:
        """Tokens per device per (half) micro-batch."""
        return self.ctx.tokens_per_source

    @property
    def group(self) -> np.ndarray:
        return self.ctx.group

    @cached_property
    def choices(self) -> list[routing.LayerChoices]:
        """Routing of the representative EP group, every MoE layer (node-limited if asked)."""
        expert_node = None
        if self.scenario.routing.node_limit:
            expert_node = self.placement.expert_node(self.ctx.device_node)
        return routing_draw.scenario_routing(self.scenario, tokens_per_source=self.tokens,
                                             expert_node=expert_node)

    def block(self, layer: int) -> BlockCost:
        if layer not in self._cache:
            moe_index = self.ctx.layout.moe_index(layer)
            choices = None if moe_index is None else self.choices[moe_index]
            self._cache[layer] = block_cost(self.ctx, layer, choices, self.placement,
                                            self.failed(layer))
        return self._cache[layer]

    def failed(self, layer: int) -> np.ndarray | None:
        """bool[ep] failed devices of the EP group running ``layer``, or None."""
        faults = self.device_faults
        if faults is None:
            return None
        for stage in faults.stage_local:
            if layer in self.ctx.layout.stage_layers(stage):
                mask = faults.failed(stage)
                return mask if mask.any() else None
        return None
