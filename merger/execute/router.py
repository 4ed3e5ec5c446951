"""Router (gate) weights of a Mixture of Experts output: the random initialisations mergekit-moe offers.

The MoE planner (:mod:`merger.plan.moe`) names the gate tensors and the gate mode; the executor draws
them here, one generator per layer, so the result does not depend on the order tensors are computed in.
"""

from __future__ import annotations

import math

import torch


# A shared expert's gate draws from generators offset past every layer's router stream (layers < 4096).
SHARED_STREAM = 50_000


def gate_weights(gate_mode: str, shape: tuple[int, int], seed: int, layer: int, shared: bool = False) -> torch.Tensor:
    """A random router matrix for one layer.

    Args:
        gate_mode: `random` (standard normal, as mergekit) or `uniform_random` (U(−1/√H, 1/√H),
            `nn.Linear`'s initialisation).
        shape: `(experts, hidden_size)`.
        seed: the run's seed; each layer draws from its own generator seeded by (seed, layer), so the
            result does not depend on the order tensors are computed in.
        layer: the layer index.
        shared: the gate of a shared expert (Qwen2-MoE's `shared_expert_gate`, shape `(1, hidden_size)`):
            its own stream, so adding one leaves the routers' draws as they were. mergekit-moe draws it
            like a router row too (random: its sigmoid gate starts near 0 or 1 per token).

    Returns:
        float32 tensor `(experts, hidden_size)`.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + layer + (SHARED_STREAM if shared else 0))
    if gate_mode == "random":
        return torch.randn(shape, generator=generator)
    bound = 1 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * (2 * bound) - bound
