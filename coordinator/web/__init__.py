"""The coordinator's monitoring page under /admin (enabled by `admin_token_file` in coordinator.yaml)."""
