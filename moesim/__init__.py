"""moesim: simulate and plan Mixture-of-Experts training and serving on GPU/TPU clusters.

Python API::

    import moesim
    scenario = moesim.load_scenario("scenarios/mixtral-8x7b-train-4node.yaml")
    sim = moesim.simulate(scenario)
    print(sim.result.step_time, sim.result.tokens_per_s)
"""

from moesim.errors import MoESimError
from moesim.spec.scenario import Scenario, load_scenario
from moesim.version import __version__

__all__ = ["MoESimError", "Scenario", "load_scenario", "simulate", "__version__"]


def simulate(scenario: Scenario, **kwargs):  # noqa: ANN201 - re-export with lazy import
    """Simulate one step of ``scenario`` (see :func:`moesim.assembly.simulate`)."""
    from moesim.assembly import simulate as _simulate

    return _simulate(scenario, **kwargs)
