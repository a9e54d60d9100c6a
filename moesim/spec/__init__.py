"""Configuration: frozen dataclasses loaded from YAML (models, hardware profiles, clusters,
scenarios), each field validated once with its units, bounds and allowed values."""
