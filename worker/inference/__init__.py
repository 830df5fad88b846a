"""What both serving engines share, and what the control path and the HTTP layer read of them.

The engine interface (``engines``), the sampling parameters of a request (``sampling``), and the
readers of a base model's config, a PEFT adapter and a safetensors header (``basemodel``, ``peft``,
``tensorfile``). It imports neither engine (``builtin/``, ``vllm/``), no torch, and nothing of
Kubernetes: both engines and the control path import it.
"""
