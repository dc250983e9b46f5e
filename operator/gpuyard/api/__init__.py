"""Pydantic models of the gpuyard kinds: the single source of the CRD schemas."""
