"""Coordinator: receives and verifies signed shards from the sites, keeps them, and trains, evaluates and
releases the shareable student (directly or through Flower federation)."""
