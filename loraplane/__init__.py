"""loraplane: LoRA adapters as Kubernetes objects, with cluster-unique IDs and multi-LoRA serving."""

__version__ = "0.1.0"
