"""A local Kubernetes API server that speaks the real HTTP API, for tests and the no-cluster demo."""
