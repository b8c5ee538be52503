"""Measuring a patched model against its original: quality (agreement, KL, embeddings), speed and memory."""
