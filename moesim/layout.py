"""Where each rank sits in the parallel layout: pipeline stage, data-parallel replica, EP group.

Ranks are ordered as Megatron-Core orders them: tensor-parallel fastest, then data-parallel, then
pipeline. Expert parallelism is carved out of the ``dp * tp`` ranks of a stage: consecutive groups
of ``ep`` ranks form the EP groups, and the ranks at the same position in different EP groups form
the expert-data-parallel group that all-reduces those experts' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.spec.scenario import Parallelism

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    par: Parallelism
    num_layers: int
    moe_layer_ids: tuple[int, ...]

    @property
    def stage_size(self) -> int:
        return self.par.dp * self.par.tp

    @property
    def expert_dp(self) -> int:
        """Replicas of each EP group inside a stage (the expert-data-parallel degree)."""
        return self.stage_size // self.par.ep

    def stage_ranks(self, stage: int) -> np.ndarray:
        """Global ranks of one pipeline stage: int[dp * tp]."""
        return np.arange(stage * self.stage_size, (stage + 1) * self.stage_size)

    def ep_group(self, stage: int, group: int = 0) -> np.ndarray:
        """Global ranks of one EP group: int[ep]."""
        start = stage * self.stage_size + group * self.par.ep
        return np.arange(start, start + self.par.ep)

    def chunk_layers(self) -> list[list[range]]:
        """Layers of each (stage, virtual chunk): ``[stage][chunk] -> range of layer ids``.

        Layers are split over pp * vp virtual stages as evenly as possible (the earlier virtual
        stages take the remainder); virtual stage v = chunk * pp + stage, as in interleaved 1F1B.
        """
        pp, vp = self.par.pp, self.par.vp
        sizes = np.full(pp * vp, self.num_layers // (pp * vp))
        sizes[: self.num_layers % (pp * vp)] += 1
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [[range(int(bounds[c * pp + s]), int(bounds[c * pp + s + 1])) for c in range(vp)]
                for s in range(pp)]

    def stage_layers(self, stage: int) -> list[int]:
        return [layer for chunk in self.chunk_layers()[stage] for layer in chunk]

    def moe_index(self, layer: int) -> int | None:
        """Index among MoE layers of block ``layer``, or None for a dense block."""
        try:
            return self.moe_layer_ids.index(layer)
        except ValueError:
            return None
