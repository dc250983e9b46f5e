"""gpuyard's local cluster: a real control plane with simulated GPU nodes, no Docker needed."""
