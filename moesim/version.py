"""The package version, in one place (results record it)."""

__version__ = "0.1.0"
