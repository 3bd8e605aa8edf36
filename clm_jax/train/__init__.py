"""Training: the jitted step, pipeline schedule, optimizer, metrics, preemption, the loop."""
