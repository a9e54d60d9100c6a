"""``moesim search``: enumerate the parallel layouts a scenario leaves open, drop the invalid ones,
screen the rest with closed-form prices, simulate the best fully (see docs/search.md)."""

from moesim.search.screen import screen_layout
from moesim.search.space import KNOBS, SearchSpec, enumerate_layouts, load_search

__all__ = ["KNOBS", "SearchSpec", "enumerate_layouts", "load_search", "screen_layout"]
