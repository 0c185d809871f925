"""Building blocks shared by the cache methods: RoPE re-rotation, padding bookkeeping, selection helpers."""
