"""merger: merge language models from mergekit-format YAML configs, streaming, tensor by tensor.

The public names are imported on first use, so that `import merger.jobs.store` (the app's side) does not
load torch.
"""

import os
from importlib import import_module

# Idle OpenMP threads sleep instead of spinning. libgomp reads this once, when torch loads, so it is
# set here, before any of our modules imports torch (a caller's own setting wins). On a busy machine
# a spinning thread holds a core the merge's other threads need (docs/decisions.md, "Thread policy").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "MergeConfig": "config",
    "MoEConfig": "config",
    "load_config": "config",
    "MergeResult": "engine",
    "run_merge": "engine",
    "MergerError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'merger' has no attribute {name!r}")
