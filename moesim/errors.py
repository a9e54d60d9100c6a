"""The one exception hierarchy of moesim.

Every error a user can cause (a bad scenario, a topology that does not connect, a placement that
does not fit) is a :class:`MoESimError`. The CLI prints its message on one line and exits 2; any
other exception is a bug in moesim. ``InternalError`` marks a broken internal invariant.
"""

from __future__ import annotations

__all__ = [
    "MoESimError",
    "ScenarioError",
    "TopologyError",
    "InfeasiblePlacement",
    "OutOfMemory",
    "CalibrationError",
    "TraceError",
    "InternalError",
]


class MoESimError(Exception):
    """Base of every error moesim raises on purpose."""


class ScenarioError(MoESimError):
    """A scenario, model, hardware profile or sweep file is invalid.

    The message names the file, the field path and what is allowed.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class TopologyError(MoESimError):
    """The cluster topology is malformed (disconnected device, zero bandwidth, unknown device)."""


class InfeasiblePlacement(MoESimError):
    """A placement is invalid or cannot be found under the given constraints."""


class OutOfMemory(MoESimError):
    """A device's memory footprint exceeds its capacity."""


class CalibrationError(MoESimError):
    """A calibration run failed or a calibrated table is unusable."""


class TraceError(MoESimError):
    """A routing trace file is malformed or does not match the model."""


class InternalError(MoESimError):
    """An internal invariant broke: a bug in moesim, never the user's fault."""
