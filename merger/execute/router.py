"""Router (gate) weights of a Mixture of Experts output: the random initialisations mergekit-moe offers.

The MoE planner (:mod:`merger.plan.moe`) names the gate tensors and the gate mode; the executor draws
them here, one generator per layer, so the result does not depend on the order tensors are computed in.
"""

from __future__ import annotations

import math

import torch


def gate_weights(gate_mode: str, shape: tuple[int, int], seed: int, layer: int) -> torch.Tensor:
    """A random router matrix for one layer.

    Args:
        gate_mode: `random` (standard normal, as mergekit) or `uniform_random` (U(−1/√H, 1/√H),
            `nn.Linear`'s initialisation).
        shape: `(experts, hidden_size)`.
        seed: the run's seed; each layer draws from its own generator seeded by (seed, layer), so the
            result does not depend on the order tensors are computed in.
        layer: the layer index.

    Returns:
        float32 tensor `(experts, hidden_size)`.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    if gate_mode == "random":
        return torch.randn(shape, generator=generator)
    bound = 1 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * (2 * bound) - bound
