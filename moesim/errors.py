"""The one exception hierarchy of moesim.

Every error a user can cause (a bad scenario, a topology that does not connect, a placement that
does not fit) is a :class:`MoESimError`. The CLI prints its message on one line and exits 2; any
other exception is a bug in moesim. ``InternalError`` marks a broken internal invariant.
"""

from __future__ import annotations

import traceback

__all__ = [
    "MoESimError",
    "ScenarioError",
    "TopologyError",
    "InfeasiblePlacement",
    "OutOfMemory",
    "CalibrationError",
    "TraceError",
    "InternalError",
    "is_internal",
    "describe_internal",
]


class MoESimError(Exception):
    """Base of every error moesim raises on purpose."""


class ScenarioError(MoESimError):
    """A scenario, model, hardware profile or sweep file is invalid.

    The message names the file, the field path and what is allowed.
    """

    # True when the check compared fields (ep must divide dp * tp): another value of one of
    # them could pass, so a sweep keeps such a point as an error row instead of refusing it.
    between_fields = False

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


def is_internal(exc: BaseException) -> bool:
    """True if ``exc`` is a bug in moesim: an InternalError or any non-MoESimError exception."""
    return isinstance(exc, InternalError) or not isinstance(exc, MoESimError)


def describe_internal(exc: BaseException) -> str:
    """One line naming the failing check of an internal error: kind, message and where it broke.

    For an InternalError the message is the check; for any other exception the innermost frame
    (``file:line in function``) says where it broke.
    """
    message = " ".join(str(exc).split()) or "(no message)"
    if len(message) > 300:
        message = message[:297] + "..."
    text = f"{type(exc).__name__}: {message}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return text
