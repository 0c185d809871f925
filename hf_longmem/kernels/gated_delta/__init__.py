"""gated_delta."""
