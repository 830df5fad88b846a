"""The worker: watch adapters, resolve, prefetch, validate, serve."""
