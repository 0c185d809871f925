"""longmem."""
