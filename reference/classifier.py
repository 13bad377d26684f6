"""A small CNN that predicts the five attributes of a shapes image; its features drive FID and IS.

    python -m reference.classifier --out reference/classifier.safetensors

Trains in a minute or two on a 2-core CPU, deterministically from ``--seed``. The network sees
images through ``to_tensor`` (uint8 or float [0, 1], NHWC) and has one softmax head per
attribute; ``features`` is its penultimate layer (``FEATURE_DIM`` values per image).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference.dataset import BACKGROUNDS, COLORS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, Attributes, make_dataset

# Class names per head, in the order of the Attributes fields.
HEADS: dict[str, tuple[str, ...]] = {
    "background": tuple(BACKGROUNDS),
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
}
assert list(HEADS) == [f.name for f in fields(Attributes)]
FEATURE_DIM = 64
DEFAULT_WEIGHTS = Path(__file__).with_name("classifier.safetensors")
# Training and held-out seeds, apart from those the tests and evaluation draw from.
TRAIN_SEED = 9001
HELD_OUT_SEED = 9002


class AttributeNet(nn.Module):
    """Four stride-2 conv blocks (64 -> 4 px), a FEATURE_DIM bottleneck, one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, 16, 32, 64, 64]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        # Flattened rather than pooled: the position head needs to know where things are.
        side = IMAGE_SIZE // 16
        self.bottleneck = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, FEATURE_DIM), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, len(names)) for names in HEADS.values())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (B, FEATURE_DIM)."""
        return self.bottleneck(self.body(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits per head, in ``HEADS`` order."""
        h = self.features(x)
        return [head(h) for head in self.heads]


def to_tensor(images) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 or float [0, 1] images -> (B, 3, 64, 64) float32 in [-1, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected images of shape (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


def labels(attributes: list[Attributes]) -> torch.Tensor:
    """(B, 5) class indices, one column per head."""
    try:
        return torch.tensor([[names.index(getattr(a, head)) for head, names in HEADS.items()] for a in attributes])
    except ValueError as e:
        raise ValueError(f"attribute value outside the dataset's classes: {e}") from None


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild pixel noise so the classifier does not hinge on the dataset's exact, clean pixels."""
    sigma = torch.rand(len(x), 1, 1, 1, generator=generator) * 0.1
    return x + sigma * torch.randn(x.shape, generator=generator)


def train(
    n: int = 20000,
    seed: int = TRAIN_SEED,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> AttributeNet:
    """Train a fresh AttributeNet on ``n`` dataset images drawn from ``seed``."""
    if n < batch_size:
        raise ValueError(f"n ({n}) must be at least one batch ({batch_size})")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, attributes = make_dataset(n, seed)
    x, y = to_tensor(images), labels(attributes)
    model = AttributeNet()
    steps = epochs * (n // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            logits = model(_augment(x[idx], generator))
            loss = sum(loss_fn(out, y[idx, k]) for k, out in enumerate(logits))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % log_every == 0 or step == steps:
                log(f"epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def predict(model: AttributeNet, images, batch_size: int = 512) -> tuple[np.ndarray, list[np.ndarray]]:
    """Features (N, FEATURE_DIM) and per-head class probabilities [(N, classes), ...]."""
    model.eval()
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size])
        h = model.features(x)
        feats.append(h.numpy())
        probs.append([torch.softmax(head(h), dim=1).numpy() for head in model.heads])
    if not feats:
        raise ValueError("no images to classify")
    return np.concatenate(feats).astype(np.float64), [np.concatenate(p).astype(np.float64) for p in zip(*probs)]


def classify(probs: list[np.ndarray]) -> list[Attributes]:
    """The most likely class of each head, as Attributes."""
    winners = [np.argmax(p, axis=1) for p in probs]
    return [
        Attributes(*(names[w[i]] for names, w in zip(HEADS.values(), winners))) for i in range(len(winners[0]))
    ]


def accuracy(predicted: list[Attributes], expected: list[Attributes]) -> dict[str, float]:
    """Per-head accuracy and "all" (every head right)."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"need equally many predictions and expectations, got {len(predicted)} and {len(expected)}")
    right = np.array([[getattr(p, h) == getattr(e, h) for h in HEADS] for p, e in zip(predicted, expected)])
    result = {h: float(right[:, k].mean()) for k, h in enumerate(HEADS)}
    result["all"] = float(right.all(axis=1).mean())
    return result


def save(model: AttributeNet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the weights as fp16 safetensors (small enough to commit); metadata values are strings."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata or {})


def load(path: str | Path = DEFAULT_WEIGHTS) -> AttributeNet:
    """An AttributeNet in eval mode with the weights from ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; train them with `python -m reference.classifier --out {path}`"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model = AttributeNet()
    model.load_state_dict(state)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    """CLI: train the classifier, report held-out accuracy, save the weights."""
    parser = argparse.ArgumentParser(
        prog="python -m reference.classifier", description="Train the shapes attribute classifier used for FID and IS."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS, help=f"weights file to write (default {DEFAULT_WEIGHTS})")
    parser.add_argument("--n", type=int, default=20000, help="training images (default 20000)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training images (default 3)")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help=f"dataset and init seed (default {TRAIN_SEED})")
    parser.add_argument("--held-out", type=int, default=2000, help="held-out images for the accuracy report (default 2000)")
    args = parser.parse_args(argv)
    if args.seed == HELD_OUT_SEED:
        parser.error(f"--seed {HELD_OUT_SEED} is the held-out seed; pick another")

    start = time.perf_counter()
    model = train(n=args.n, seed=args.seed, epochs=args.epochs)
    seconds = time.perf_counter() - start
    images, attributes = make_dataset(args.held_out, HELD_OUT_SEED)
    scores = accuracy(classify(predict(model, images)[1]), attributes)
    print(f"trained in {seconds:.0f} s; held-out accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    metadata = {"train_n": str(args.n), "epochs": str(args.epochs), "seed": str(args.seed), "held_out_accuracy": json.dumps(scores)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(model, args.out, metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
