"""A loaded bundle's LoRA slots: which adapters feed them, switched by set_lora without a rebuild.

The slot inputs (runtime.lora_slots.SlotState) are fed with every call of a slotted component's engine (SlotFed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Manifest
from .errors import BundleError
from .lora import MAX_SCALE, LoraError, file_rank, read_adapter
from .lora_slots import SlotFed, SlotState, rank_needed
from .protocol import Engine

# set_lora's adapters: None, a file, or a list of files and (file, scale) pairs
LoraSpec = str | Path | Sequence[str | Path | tuple[str | Path, float]] | None


class Slots:
    """The LoRA slots of one loaded bundle (none where it was built without --lora-slots)."""

    def __init__(self, bundle: Path, manifest: Manifest, rebuild: Callable[..., str]):
        self.bundle, self.manifest, self.rebuild = bundle, manifest, rebuild
        self._slots = _slot_state(manifest)  # LoRA slot inputs, fed with every UNet and text encoder call

    def pinned(self) -> AbstractContextManager[None]:
        """One generation's scope: its calls are fed the adapters set when it began (runtime.lora_slots.SlotState.pinned)."""
        return self._slots.pinned() if self._slots is not None else nullcontext()

    def fed(self, engine: Engine) -> Engine:
        """A slotted component's engine gets the current LoRA slot inputs with every call."""
        if self._slots is not None and engine.component.name in self._slots.feeds:
            return SlotFed(engine, self._slots)
        return engine

    def set(self, adapters: LoraSpec, scale: float = 1.0) -> None:
        """Switch LoRA adapters for the generations that follow, without a rebuild and without touching the weights.

        adapters: None (the base model), a .safetensors file (at `scale`), or a list of files and (file, scale) pairs,
        e.g. [("style.safetensors", 0.8), ("detail.safetensors", 0.5)]. Needs a bundle built with --lora-slots RANK;
        the adapters' ranks per layer must sum to at most RANK. Every adapter is checked before any takes effect.
        """
        wanted = _lora_list(adapters, scale)
        lora = self.manifest.lora
        if self._slots is None or lora is None:
            need = max(8, sum(file_rank(Path(p)) for p, _ in wanted)) if wanted else 8
            fused = f" (its adapters {', '.join(Path(a.file).name for a in lora.fused)} are fused into its weights)" if lora else ""
            raise BundleError(
                f"bundle {self.bundle} has no LoRA slots{fused}: it was built without --lora-slots, so adapters cannot be switched "
                f"at run time. Rebuild it with slots: `{self.rebuild(lora=[], lora_slots=need)}`, or fuse one adapter at export "
                "with --lora FILE[:SCALE]"
            )
        read = []
        for path, s in wanted:
            fix = f"; fuse it at export instead: `{self.rebuild(lora=[*(f'{a.file}:{a.scale!r}' for a in lora.fused), f'{path}:{s!r}'])}`"
            read.append((read_adapter(path, self._slots.layers, where=f"bundle {self.bundle}'s LoRA slots", fix=fix), s))
        need, where = rank_needed(read)
        if need > self._slots.rank:
            ranks = " + ".join(f"{a.name}: {a.rank}" for a, _ in read)
            raise LoraError(
                f"the adapters need rank {need} at {where} ({ranks}), but bundle {self.bundle}'s LoRA slots have rank "
                f"{self._slots.rank}; rebuild it with larger slots: `{self.rebuild(lora_slots=need)}`"
            )
        self._slots.set(read)

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The adapters set_lora switched on, as (file name, scale); () for the base model or a bundle without slots."""
        return tuple((a.name, s) for a, s in self._slots.active) if self._slots is not None else ()


def _slot_state(manifest: Manifest) -> SlotState | None:
    """The zero slot inputs of a bundle built with --lora-slots; None for a bundle without."""
    lora = manifest.lora
    if lora is None or not lora.slot_rank:
        return None
    shapes = {(c.name, t.name): t.shape for c in manifest.components.values() for t in c.inputs if t.name.startswith("lora_")}
    return SlotState([t for t in lora.targets if t.component in manifest.components], lora.slot_rank, shapes)


def _lora_list(adapters: LoraSpec, scale: float) -> list[tuple[Path, float]]:
    """set_lora's argument as (file, scale) pairs; anything else is a TypeError naming what was given."""
    if adapters is None:
        return []
    pair = isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[0], (str, Path))
    pair = pair and not isinstance(adapters[1], (str, Path))  # type: ignore[index]
    if isinstance(adapters, (str, Path)):
        items: list[Any] = [(adapters, scale)]
    else:
        items = [adapters] if pair else list(adapters)
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = (item, scale)
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, Path))):
            raise TypeError(f"set_lora takes None, a file, or a list of files and (file, scale) pairs; got {item!r:.80}")
        s = item[1]
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not abs(s) <= MAX_SCALE:
            raise ValueError(f"set_lora: the scale of {item[0]} must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g}, got {s!r}")
        out.append((Path(item[0]), float(s)))
    return out
