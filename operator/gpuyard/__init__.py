"""gpuyard: GPU scheduling, autoscaling and per-second usage billing for Kubernetes."""

API_GROUP = "gpuyard.io"
API_VERSION = "v1alpha1"
FIELD_MANAGER = "gpuyard"
__version__ = "0.1.0"
