"""continual."""
