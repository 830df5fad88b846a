"""A local Kubernetes API server that speaks the real HTTP API, for tests and the no-cluster demo."""

from loraplane.localkube.server import LocalKube, main, write_kubeconfig

__all__ = ["LocalKube", "main", "write_kubeconfig"]
