"""The pre-merge report, from the weights alone: per layer and per model the task vector's norm (also
relative to the base's), the cosine between task vectors and the share of sign conflicts, with warnings
where a method will misbehave.

Streaming: one tensor name at a time is read from each model (:class:`merger.io.loader.TensorReader`,
positioned reads into pooled buffers) and reduced in float32 chunks of :data:`CHUNK` entries, so memory
is about (models + 1) × the largest stored tensor, plus the chunks.

Definitions, per group of tensors (a decoder layer, the embeddings, the head, the rest), with
`τᵢ = modelᵢ − base` over the group's tensors flattened into one vector:
- norm `‖τᵢ‖₂`; relative norm `‖τᵢ‖ / ‖base‖`;
- cosine `τᵢ·τⱼ / (‖τᵢ‖ ‖τⱼ‖)` (NaN when either is zero);
- sign conflicts: of the entries where both `τᵢ` and `τⱼ` are non-zero, the share with opposite signs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from merger.io.buffers import BufferPool
from merger.io.loader import STORAGE_DTYPES, TensorReader
from merger.io.metadata import read_checkpoint
from merger.timeouts import check_deadline

CHUNK = 2**22  # float32 entries reduced at once (16 MiB per model)
NOT_A_FINE_TUNE = 0.5  # ‖τ‖/‖base‖ above this: too far to be a fine-tune of the base (independent inits give ~1.4)
ALMOST_BASE = 1e-3  # ‖τ‖/‖base‖ below this: the fine-tune adds almost nothing
TASK_VECTOR_METHODS = frozenset({
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "sce", "model_stock",
})
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class GroupStats:
    """The numbers of one group of tensors (a layer, `embeddings`, `head`, `other`, or `all`).

    Attributes:
        group: the group's name.
        norms: `‖τᵢ‖₂` per model (float, in the weights' units).
        relative: `‖τᵢ‖ / ‖base‖` per model.
        cosines: `(i, j)` -> cosine between `τᵢ` and `τⱼ`, `i < j`.
        conflicts: `(i, j)` -> share (0–1) of entries non-zero in both with opposite signs.
    """

    group: str
    norms: tuple[float, ...]
    relative: tuple[float, ...]
    cosines: dict[tuple[int, int], float]
    conflicts: dict[tuple[int, int], float]


@dataclass
class _Sums:
    """Running sums of one group (float64 / int)."""

    models: int
    base_sq: float = 0.0
    sq: list[float] = field(default_factory=list)
    dot: dict[tuple[int, int], float] = field(default_factory=dict)
    both: dict[tuple[int, int], int] = field(default_factory=dict)
    opposed: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self):
        self.sq = [0.0] * self.models
        for pair in combinations(range(self.models), 2):
            self.dot[pair], self.both[pair], self.opposed[pair] = 0.0, 0, 0

    def add(self, base: torch.Tensor, deltas: list[torch.Tensor]) -> None:
        self.base_sq += float(base.double().square().sum())
        for i, delta in enumerate(deltas):
            self.sq[i] += float(delta.double().square().sum())
        signs = [torch.sign(delta) for delta in deltas]
        for i, j in self.dot:
            self.dot[i, j] += float((deltas[i].double() * deltas[j].double()).sum())
            product = signs[i] * signs[j]
            self.both[i, j] += int((product != 0).sum())
            self.opposed[i, j] += int((product < 0).sum())

    def stats(self, group: str) -> GroupStats:
        norms = tuple(math.sqrt(s) for s in self.sq)
        base_norm = math.sqrt(self.base_sq)
        return GroupStats(
            group,
            norms,
            tuple(n / base_norm if base_norm else math.nan for n in norms),
            {p: d / (norms[p[0]] * norms[p[1]]) if norms[p[0]] * norms[p[1]] else math.nan for p, d in self.dot.items()},
            {p: self.opposed[p] / self.both[p] if self.both[p] else 0.0 for p in self.dot},
        )


@dataclass(frozen=True)
class WeightReport:
    """The report of several models against a base.

    Attributes:
        base: the base (or, for methods without one, the reference model) as named.
        models: the other models as named.
        groups: per group, in the checkpoint's order (layers in order).
        total: the same numbers over every compared tensor (`all`).
        skipped: tensors not compared (not floating point, or missing / shaped differently in a model).
        warnings: where the configured method will misbehave.
    """

    base: str
    models: tuple[str, ...]
    groups: tuple[GroupStats, ...]
    total: GroupStats
    skipped: tuple[str, ...]
    warnings: tuple[str, ...]

    def text(self) -> str:
        """The report for people: a legend, a markdown table per group, then the warnings."""
        n = len(self.models)
        pairs = list(combinations(range(n), 2))
        lines = [f"weight report against the base `{self.base}` (τ = model − base):"]
        lines += [f"  M{i + 1} = {name}" for i, name in enumerate(self.models)]
        head = ["group", *(f"‖τ M{i + 1}‖ (rel.)" for i in range(n)),
                *(f"cos M{i + 1}·M{j + 1}" for i, j in pairs), *(f"sign conflicts M{i + 1}·M{j + 1}" for i, j in pairs)]
        lines += ["", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for stats in (*self.groups, self.total):
            cells = [stats.group, *(f"{a:.4g} ({r:.2%})" for a, r in zip(stats.norms, stats.relative)),
                     *(f"{stats.cosines[p]:+.3f}" for p in pairs), *(f"{stats.conflicts[p]:.1%}" for p in pairs)]
            lines.append("| " + " | ".join(cells) + " |")
        if self.skipped:
            lines.append(f"\nnot compared ({len(self.skipped)}): " + ", ".join(self.skipped[:5])
                         + (", ..." if len(self.skipped) > 5 else ""))
        lines += [""] + [f"warning: {w}" for w in self.warnings] if self.warnings else ["", "no warnings"]
        return "\n".join(lines)


def group_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `layer 3`; embeddings, head and the rest by name."""
    if match := _LAYER.search(name):
        return f"layer {match.group(1)}"
    if "embed" in name or "wte" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "other"


def weight_report(base: tuple[str, Path], models: list[tuple[str, Path]], method: str | None = None) -> WeightReport:
    """Compare `models` with `base`, tensor by tensor, streaming.

    Args:
        base: (name, folder) of the base model.
        models: (name, folder) of each other model, at least one.
        method: the `merge_method` the models are meant for (its warnings); None for none.

    Returns:
        A :class:`WeightReport`.

    Raises:
        ModelNotFoundError / ModelFileError subclasses: a folder without readable safetensors weights.
    """
    pool = BufferPool(max_retained=4 * CHUNK * 4)
    readers = [TensorReader(folder, pool) for _, folder in [base, *models]]
    try:
        layouts = [{name: stored for layout in read_checkpoint(folder).values() for name, stored in layout.items()}
                   for _, folder in [base, *models]]
        sums: dict[str, _Sums] = {}
        total, skipped = _Sums(len(models)), []
        for name, stored in layouts[0].items():
            dtype = STORAGE_DTYPES[stored.meta.dtype]
            if not dtype.is_floating_point or any(
                    name not in layout or layout[name].meta.shape != stored.meta.shape for layout in layouts[1:]):
                skipped.append(name)
                continue
            check_deadline(f"reading `{name}`")  # an app's time-limited report stops here when its time is up
            group = sums.setdefault(group_of(name), _Sums(len(models)))
            tensors = [reader.read(name).reshape(-1) for reader in readers]
            for start in range(0, tensors[0].numel(), CHUNK):
                chunk = tensors[0][start:start + CHUNK].float()
                deltas = [t[start:start + CHUNK].float() - chunk for t in tensors[1:]]
                group.add(chunk, deltas)
                total.add(chunk, deltas)
            pool.give(tensors)
    finally:
        for reader in readers:
            reader.close()
    groups = tuple(s.stats(g) for g, s in sorted(sums.items(), key=lambda item: _order(item[0])))
    names = tuple(name for name, _ in models)
    overall = total.stats("all")
    return WeightReport(base[0], names, groups, overall, tuple(skipped), _warnings(method, names, groups, overall))


def _order(group: str) -> tuple[int, int]:
    """Embeddings first, then layers in order, then the rest, then the head."""
    if group.startswith("layer "):
        return (1, int(group[6:]))
    return ({"embeddings": 0, "other": 2, "head": 3}[group], 0)


def _warnings(method: str | None, names: tuple[str, ...], groups: tuple[GroupStats, ...], total: GroupStats) -> tuple[str, ...]:
    out = []
    for i, name in enumerate(names):
        relative = total.relative[i]
        if method in TASK_VECTOR_METHODS and relative > NOT_A_FINE_TUNE:
            out.append(f"`{name}` differs from the base by {relative:.0%} of the base's norm: it does not look like a "
                       f"fine-tune of it, and `{method}` adds task vectors to the base; use the model it was "
                       "fine-tuned from as `base_model`, or a method without a base (linear, slerp)")
        elif relative < ALMOST_BASE:
            out.append(f"`{name}` is almost its base (task vector {relative:.3%} of the base's norm): it adds "
                       "almost nothing to the merge")
    if method == "model_stock":
        for (i, j), _ in total.cosines.items():
            opposed = [g.group for g in groups if g.cosines[i, j] < 0]
            if opposed:
                out.append(f"model_stock: the task vectors of `{names[i]}` and `{names[j]}` point in opposite "
                           f"directions (negative cosine) in {', '.join(opposed[:6])}{', ...' if len(opposed) > 6 else ''}; "
                           "model_stock's interpolation ratio is meaningless there; use ties or task_arithmetic")
    return tuple(out)


def report_for_config(config_text: str, token: str | None = None) -> WeightReport:
    """The weight report of a merge config's models (downloads Hub models' weights).

    The base is the config's `base_model`; without one, the first model is the reference.

    Raises:
        ConfigError subclasses: the config does not parse, or names fewer than two models.
        ModelNotFoundError / HubError / ModelFileError subclasses: a model cannot be read.
    """
    from merger.config.schema import MoEConfig
    from merger.config.load import load_config
    from merger.errors import ConfigError
    from merger.io.resolve import materialize

    config = load_config(config_text)
    if isinstance(config, MoEConfig):
        raise ConfigError("`--report` compares models merged into one; a mergekit-moe config keeps its experts apart")
    refs = list({ref.key: ref for ref in config.referenced_models()}.values())
    if len(refs) < 2:
        raise ConfigError("`--report` needs at least two distinct models in the config")
    folders = materialize(refs, token)
    base = config.base_model or refs[0]
    others = [(str(ref), folders[ref.key]) for ref in refs if ref.key != base.key]
    return weight_report((str(base), folders[base.key]), others, config.merge_method)
