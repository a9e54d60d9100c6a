"""The simulator: cost models assembled into a SimPy model of one training or inference step."""

from moesim.sim.simulate import simulate_step

__all__ = ["simulate_step"]
