"""titans_memory."""
