"""The device mesh, logical-to-mesh sharding rules, the distributed runtime, GPU environment."""
