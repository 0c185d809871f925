"""The package version, in one place (``pyproject.toml`` reads it; checkpoints record it as ``hf_longmem_version``)."""

__version__ = "0.1.0"
