"""The merge methods: the registry (:mod:`merger.methods.registry`) and one module per method.

Importing the package imports every method module, each of which registers itself with
:func:`~merger.methods.registry.merge_method`, so `METHODS` is complete whichever module is imported
first. Method modules import the registry, never this package, so there is no import cycle.
"""

from merger.methods import (  # noqa: F401  (registers the methods)
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
