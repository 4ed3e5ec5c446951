"""merger: merge language models from mergekit-format YAML configs, streaming, tensor by tensor."""

from .config import MergeConfig, MoEConfig, load_config
from .engine import MergeResult, run_merge
from .errors import MergerError

__all__ = ["MergeConfig", "MoEConfig", "MergeResult", "MergerError", "load_config", "run_merge"]
