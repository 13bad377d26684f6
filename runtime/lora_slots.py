"""LoRA slots: several adapters, each with its scale, stacked along the rank of one bundle's LoRA slot inputs.

The adapters come from runtime.lora (reading and checking the files); this module only lays their matrices out as
the slot inputs a slotted bundle's engines are fed on every call (runtime.slots switches them for set_lora). Kept
apart from the file reading so that each module does one job (and runtime/ stays under 400 lines a module, issue 29).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from .bundle import LoraTarget
from .lora import Adapter, Layer, LoraError, Update

Shapes = Mapping[tuple[str, str], tuple[int, ...]]  # (component, input name) -> the slot input's shape
Feeds = dict[str, dict[str, np.ndarray]]  # component -> its slot inputs


def slot_layers(targets: Sequence[LoraTarget]) -> dict[str, dict[str, Layer]]:
    """The layers a slotted bundle takes adapters for, as read_adapter checks them."""
    out: dict[str, dict[str, Layer]] = {}
    for t in targets:
        out.setdefault(t.component, {})[t.module] = Layer(t.kind, t.in_features, t.out_features)
    return out


def rank_needed(adapters: Sequence[tuple[Adapter, float]]) -> tuple[int, str]:
    """The largest sum of ranks any one layer gets, and that layer ("" without adapters)."""
    per_layer: dict[tuple[str, str], int] = {}
    for adapter, _ in adapters:
        for u in adapter.updates:
            per_layer[(u.component, u.module)] = per_layer.get((u.component, u.module), 0) + u.rank
    if not per_layer:
        return 0, ""
    (component, module), rank = max(per_layer.items(), key=lambda kv: kv[1])
    return rank, f"{component} layer {module}"


def slot_feeds(
    targets: Sequence[LoraTarget], rank: int, shapes: Shapes, adapters: Sequence[tuple[Adapter, float]]
) -> dict[str, dict[str, np.ndarray]]:
    """The slot inputs per component: A^T (in, rank) holds the adapters' down matrices side by side along the rank,
    B^T (rank, out) their up matrices times scale * alpha / rank; the rest zeros (the base model). Ranks must fit `rank`."""
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for t in targets:
        for name in (t.a, t.b):
            feeds.setdefault(t.component, {}).setdefault(name, np.zeros(shapes[(t.component, name)], dtype=np.float32))
    by_layer: dict[tuple[str, str], list[tuple[Update, float]]] = {}
    for adapter, scale in adapters:
        for u in adapter.updates:
            by_layer.setdefault((u.component, u.module), []).append((u, scale))
    index = {(t.component, t.module): t for t in targets}
    for key, updates in by_layer.items():
        t = index[key]
        a, b = feeds[t.component][t.a], feeds[t.component][t.b]
        offset = 0
        for u, scale in updates:
            if offset + u.rank > rank:
                raise LoraError(f"{t.component} layer {t.module}: the adapters' ranks exceed the slot rank {rank}")
            a[t.index, :, offset : offset + u.rank] = u.down.T
            b[t.index, offset : offset + u.rank, :] = (u.up.astype(np.float64) * (scale * u.alpha / u.rank)).astype(np.float32).T
            offset += u.rank
    return feeds


Setting = tuple[Feeds, tuple[tuple["Adapter", float], ...]]  # the slot inputs and the adapters they were made from


class SlotState:
    """The slot inputs a slotted bundle's engines are fed on every call: zeros (the base model) until set.

    A generation runs inside `pinned()`: every engine call of it is fed the adapters current when it began, whatever
    set() does meanwhile (from another thread), so an image is never half one adapter and half another. set() never
    waits: it takes effect from the next generation.
    """

    def __init__(self, targets: Sequence[LoraTarget], rank: int, shapes: Shapes):
        self.targets, self.rank, self.shapes = tuple(targets), rank, dict(shapes)
        self.layers = slot_layers(self.targets)
        # (feeds, active), replaced whole: a reader sees one setting or the next, never half of each
        self._current: Setting = (slot_feeds(self.targets, rank, self.shapes, ()), ())
        self._pinned: ContextVar[Setting | None] = ContextVar(f"lora_slots_{id(self)}", default=None)

    def set(self, adapters: Sequence[tuple[Adapter, float]]) -> None:
        """New feeds built from scratch (never updated in place: A -> B -> A feeds A's very arrays again)."""
        self._current = (slot_feeds(self.targets, self.rank, self.shapes, adapters), tuple(adapters))

    def _seen(self) -> Setting:
        return self._pinned.get() or self._current

    @property
    def feeds(self) -> Feeds:
        """The slot inputs this call gets: its generation's, or the current ones outside a generation."""
        return self._seen()[0]

    @property
    def active(self) -> tuple[tuple[Adapter, float], ...]:
        return self._seen()[1]

    @contextmanager
    def pinned(self) -> Iterator[None]:
        """Run a generation on the adapters set now (a nested generation keeps its outer one's)."""
        token = self._pinned.set(self._current) if self._pinned.get() is None else None
        try:
            yield
        finally:
            if token is not None:
                self._pinned.reset(token)


class SlotFed:
    """An engine whose calls also get its component's current slot inputs: the Engine protocol, unchanged for callers."""

    def __init__(self, engine: Any, state: SlotState):
        self.engine, self.state, self.component = engine, state, engine.component

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = self.engine({**feed, **self.state.feeds.get(self.component.name, {})})
        return out

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()
