"""Where each rank sits in the parallel layout: pipeline stage, data-parallel replica, context-
parallel group, EP group.

Ranks are ordered as Megatron-Core orders them: tensor-parallel fastest, then context-parallel,
data-parallel, pipeline. Expert parallelism is carved out of the ``dp * cp * tp`` ranks of a
stage: consecutive groups of ``ep`` ranks form the EP groups (under expert tensor parallelism
with EP, the ranks at one position of ``ep`` consecutive groups of ``etp`` ranks), and the ranks
at the same position in different EP groups form the expert-data-parallel group that all-reduces
those experts' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.errors import ScenarioError
from moesim.spec.scenario import Parallelism, Scenario, pipeline_end_layers

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    par: Parallelism
    num_layers: int
    moe_layer_ids: tuple[int, ...]
    first_extra: int = 0    # layers' worth of work the first stage does besides its blocks
    last_extra: int = 0     # same, last stage (LM head and loss, MTP modules)

    @classmethod
    def for_scenario(cls, s: Scenario) -> Layout:
        """The scenario's layout, with the ends counted as layers where it asks."""
        par, m = s.parallelism, s.model
        layout = cls(par, m.num_layers, m.moe_layer_ids, *pipeline_end_layers(s))
        sizes = layout._sizes()
        if sizes.min() < 0 or sizes.max() == 0:
            raise ScenarioError(f"{m.num_layers} layers cannot be split over pp * vp = "
                                f"{par.pp * par.vp} virtual stages with the embedding and loss "
                                "counted as layers", source=s.source,
                                field="parallelism.account_for_loss")
        return layout

    @property
    def stage_size(self) -> int:
        return self.par.dp * self.par.cp * self.par.tp

    @property
    def ep_groups(self) -> int:
        """EP groups in a stage (each ``ep`` consecutive ranks, :meth:`ep_group`)."""
        return self.stage_size // self.par.ep

    @property
    def expert_dp(self) -> int:
        """Replicas of each EP group inside a stage (the expert-data-parallel degree); under
        expert tensor parallelism, replicas of each expert slice, ``etp`` ranks apart."""
        return self.stage_size // (self.par.ep * self.par.etp)

    def stage_ranks(self, stage: int) -> np.ndarray:
        """Global ranks of one pipeline stage: int[dp * cp * tp]."""
        return np.arange(stage * self.stage_size, (stage + 1) * self.stage_size)

    @property
    def ep_stride(self) -> int:
        """Ranks between consecutive members of an EP group: 1, or under expert tensor
        parallelism with EP, ``etp`` (each member one rank of a group of ``etp`` ranks that
        split the experts; Megatron-Core's expert layout, ETP fastest)."""
        return self.par.etp if self.par.ep > 1 else 1

    def ep_group(self, stage: int, group: int = 0) -> np.ndarray:
        """Global ranks of one EP group: int[ep], :attr:`ep_stride` apart."""
        stride = self.ep_stride
        block, position = divmod(group, stride)
        start = stage * self.stage_size + block * self.par.ep * stride + position
        return start + stride * np.arange(self.par.ep)

    def ep_position(self, rank: int) -> int:
        """Index of global ``rank`` in its EP group (:meth:`ep_group`)."""
        return ((rank % self.stage_size) // self.ep_stride) % self.par.ep

    def cp_group(self, stage: int, index: int = 0) -> np.ndarray:
        """Global ranks of one context-parallel group: int[cp], ``tp`` apart (tensor-parallel
        ranks are the fastest); ``index`` counts the groups of a stage, ``tp`` per data-parallel
        replica."""
        tp, cp = self.par.tp, self.par.cp
        replica, tp_rank = divmod(index, tp)
        start = stage * self.stage_size + replica * cp * tp + tp_rank
        return start + tp * np.arange(cp)

    def chunk_layers(self) -> list[list[range]]:
        """Layers of each (stage, virtual chunk): ``[stage][chunk] -> range of layer ids``.

        Layers are split over pp * vp virtual stages as evenly as possible (the earlier virtual
        stages take the remainder); virtual stage v = chunk * pp + stage, as in interleaved 1F1B.
        """
        pp, vp = self.par.pp, self.par.vp
        bounds = np.concatenate([[0], np.cumsum(np.maximum(self._sizes(), 0))])
        if self.dual:    # DualPipe: device s runs stage s of direction 0, pp-1-s of direction 1
            return [[range(int(bounds[v]), int(bounds[v + 1])) for v in (s, pp - 1 - s)]
                    for s in range(pp)]
        return [[range(int(bounds[c * pp + s]), int(bounds[c * pp + s + 1])) for c in range(vp)]
                for s in range(pp)]

    @property
    def dual(self) -> bool:
        """DualPipe: every device holds two stages, one per direction."""
        return self.par.schedule == "dualpipe"

    def holds_ends(self, stage: int) -> tuple[bool, bool]:
        """(embedding, LM head + loss) on device ``stage``: the first and the last stage, both
        on either end device under DualPipe."""
        last = self.par.pp - 1
        if self.dual:
            return stage in (0, last), stage in (0, last)
        return stage == 0, stage == last

    def chunk_ends(self, stage: int, chunk: int) -> tuple[bool, bool]:
        """(first, last) virtual stage: chunk ``chunk`` of device ``stage`` starts with the
        embedding, or ends with the LM head and loss."""
        pp, vp = self.par.pp, self.par.vp
        if self.dual:   # chunk d is direction d; direction 1 enters at device pp-1
            entry = 0 if chunk == 0 else pp - 1
            return stage == entry, stage == pp - 1 - entry
        return stage == 0 and chunk == 0, stage == pp - 1 and chunk == vp - 1

    def _sizes(self) -> np.ndarray:
        """Blocks per virtual stage: ``num_layers`` plus the ends' extra layers split as evenly
        as possible (earlier virtual stages take the remainder), the extras then taken off the
        first and last virtual stages."""
        stages = self.par.pp * self.par.vp
        total = self.num_layers + self.first_extra + self.last_extra
        sizes = np.full(stages, total // stages)
        sizes[: total % stages] += 1
        sizes[0] -= self.first_extra
        sizes[-1] -= self.last_extra
        return sizes

    def stage_layers(self, stage: int) -> list[int]:
        return [layer for chunk in self.chunk_layers()[stage] for layer in chunk]

    def moe_index(self, layer: int) -> int | None:
        """Index among MoE layers of block ``layer``, or None for a dense block."""
        try:
            return self.moe_layer_ids.index(layer)
        except ValueError:
            return None
