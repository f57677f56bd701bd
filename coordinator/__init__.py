"""Coordinator: receives and verifies signed shards and trains the shareable student (see issue 3)."""
