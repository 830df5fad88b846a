"""The LoRAAdapter / LoRAWorker API: pydantic models, conditions, errors, and the generated CRD YAML."""
