"""Expert placement: which device slots hold which experts, and planners that choose it."""

from moesim.placement.placement import Placement

__all__ = ["Placement"]
