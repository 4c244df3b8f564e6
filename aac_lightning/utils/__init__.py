"""Small helpers shared across the package (distributed collectives, ...)."""
