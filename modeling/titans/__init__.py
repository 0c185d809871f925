"""titans."""
