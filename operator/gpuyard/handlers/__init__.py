"""Glue between Kopf events, the pure core and I/O."""
