"""loraplane: LoRA adapters as Kubernetes objects, with cluster-unique IDs and multi-LoRA serving."""

import os as _os

__version__ = "0.1.0"

# The folder operator/ has no __init__.py on purpose: a regular package there would be imported as the
# standard library's `operator` by any `python -m ...` run from the repository root. As an implicit
# namespace package it is found only through a parent's __path__: a wheel has it inside loraplane/;
# in a source checkout (editable install) the repository root is added here so loraplane.operator
# resolves to operator/.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "operator", "main.py")) and _root not in __path__:
    __path__.append(_root)
