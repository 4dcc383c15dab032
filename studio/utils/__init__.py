"""Bottom-layer utilities every layer may use: atomic files, settings parsing."""
