"""The release, readable without importing anything heavy (the bottom layer)."""

__version__ = "0.1.0"
