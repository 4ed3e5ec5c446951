"""Router (gate) weights of a Mixture of Experts output: every gate mode mergekit-moe offers.

The MoE planner (:mod:`merger.plan.moe`) names the gate tensors, the gate mode and (for prompt gates)
the experts' prompts. Random gates are drawn here, one generator per layer, so the result does not
depend on the order tensors are computed in; prompt gates are computed once for all layers, before
the merge streams, by :mod:`merger.execute.prompt_gates`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from merger.config.schema import PROMPT_GATE_MODES
from merger.execute.prompt_gates import prompt_gate_weights
from merger.io.buffers import BufferPool
from merger.lora.apply import open_reader
from merger.plan.merge import MergePlan, TensorJob


def prompt_routers(
    plan: MergePlan,
    dirs: dict[str, Path],
    adapters: dict[str, Path],
    pool: BufferPool,
    device: torch.device,
    should_cancel: Callable[[], bool] | None,
) -> torch.Tensor | None:
    """Every layer's router computed from the experts' prompts, or None when the plan's gates are random.

    Args:
        plan: the MoE plan (its gate jobs carry the mode and prompts; the base is `plan.base_model`).
        dirs / adapters: model key -> local folder, LoRA adapter folder (a `base+lora` base runs with its adapter).
        pool: where read buffers come from.
        device: where the forward pass runs.
        should_cancel: polled between layers.

    Returns:
        float32 `(layers, experts, hidden_size)`, or None.

    Raises:
        See :func:`merger.execute.prompt_gates.prompt_gate_weights`.
    """
    job = next((j for j in plan.jobs if j.method == "gate" and j.global_params["gate_mode"] in PROMPT_GATE_MODES), None)
    if job is None:
        return None
    key = plan.base_model.key
    reader = open_reader(dirs[key], pool, adapters.get(key), str(plan.base_model))
    try:
        return prompt_gate_weights(job.global_params["gate_mode"], job.global_params["prompts"], dirs[key], reader,
                                   device, should_cancel)
    finally:
        reader.close()


def router_weights(job: TensorJob, seed: int, prompt_gates: torch.Tensor | None) -> torch.Tensor:
    """The router matrix of one gate job: its layer's prompt gate, or drawn by :func:`gate_weights`.

    Returns:
        float32 tensor `(experts, hidden_size)`, or `(1, hidden_size)` for a shared expert's gate.
    """
    mode, layer, shared = job.global_params["gate_mode"], job.global_params["layer"], job.global_params.get("shared", False)
    if mode in PROMPT_GATE_MODES:  # rows: the routed experts', then the shared expert's
        return prompt_gates[layer][-1:] if shared else prompt_gates[layer][: job.shape[0]]
    return gate_weights(mode, job.shape, seed, layer, shared=shared)


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
