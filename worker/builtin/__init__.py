"""The multi-LoRA inference engine (torch)."""
