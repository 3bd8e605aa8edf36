"""The planner: memory, FLOPs and time per layout, and XLA's cross-check of its estimates."""
