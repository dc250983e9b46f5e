"""The only code that talks to the outside world: Kubernetes, Prometheus, usage sinks."""
