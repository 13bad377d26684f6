"""Score a shapes engine bundle: attribute accuracy, domain FID and IS, speed, per sampler setting.

    python -m reference.evaluate --bundle engines/shapes --n 200 --guidance-scale 1 3 5 8 --steps 50

Every setting renders the same canonical prompts (random Attributes from ``--seed``) from the
same initial noise, so settings compare pair-wise. Metrics:

- accuracy: ``reference.checker`` reads each image's attributes back, per attribute and "all";
  ``classifier_all`` is the same all-five check by the trained classifier, a second opinion;
- FID: Frechet distance between Gaussians fitted to the classifier's penultimate features of the
  generated images and of held-out dataset images (real-vs-real is not 0 at small n: bias);
- IS: exp(E_x KL(p(y|x) || p(y))) over the joint class y of all five heads (540 classes, p(y|x)
  the product of the head softmaxes), so it is at most min(540, n);
- sec/img: wall-clock generation time divided by the image count.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reference import checker, classifier
from reference.dataset import (
    IMAGE_SIZE,
    Attributes,
    canonical_caption,
    caption_grid,
    make_dataset,
    sample_attributes,
)
from runtime import atomic
from runtime.sampling import SAMPLERS

# Held-out real images for FID, apart from the classifier's training and held-out seeds.
REAL_SEED = 31337
# A second real set, scored like a generated one, to show FID's small-sample floor.
BASELINE_SEED = 31338
ACCURACIES = ("background", "color", "shape", "size", "position", "all", "classifier_all")


@dataclass(frozen=True)
class Setting:
    """One sampler configuration to evaluate."""

    scheduler: str
    steps: int
    guidance: float
    decoder: str = "full"  # the bundle's full VAE decoder, or its tiny one (export.build --tiny-vae)
    cache_interval: int = 1  # DeepCache: the full UNet every that many steps (export.build --deepcache)

    @property
    def slug(self) -> str:
        levers = ("_tiny" if self.decoder == "tiny" else "") + (f"_cache{self.cache_interval}" if self.cache_interval > 1 else "")
        return f"{self.scheduler}_{self.steps}steps_g{self.guidance:g}{levers}"


# (prompts, setting, seed) -> float images (len(prompts), 64, 64, 3) in [0, 1].
Generate = Callable[[list[str], Setting, int], np.ndarray]


@dataclass(frozen=True)
class RealStatistics:
    """Mean and covariance of the classifier features of held-out dataset images."""

    mean: np.ndarray
    cov: np.ndarray


def pipeline_generator(pipe: Any, output_type: str = "np") -> Generate:
    """Generate with a ``runtime.Pipeline``: prompts go in groups of its batch size, the last padded.

    output_type "latent": the final latents instead of images (reference.evaluate_levers decodes them twice)."""
    batch = pipe.batch_size

    def generate(prompts: list[str], setting: Setting, seed: int) -> np.ndarray:
        out = []
        for group_index, start in enumerate(range(0, len(prompts), batch)):
            group = prompts[start : start + batch]
            padded = group + [group[-1]] * (batch - len(group))
            images = pipe.txt2img(
                padded,
                negative_prompt="",
                steps=setting.steps,
                guidance_scale=setting.guidance,
                scheduler=setting.scheduler,
                # One seed per group so groups do not share their initial noise.
                seed=seed + group_index,
                output_type=output_type,
                **levers(setting),
            )
            out.append(np.asarray(images)[: len(group)])
        return np.concatenate(out)

    return generate


def levers(setting: Setting) -> dict[str, Any]:
    """The speed levers a setting asks for, as task keywords (none where it asks for the defaults, so bundles
    and runtimes without them evaluate as before)."""
    out: dict[str, Any] = {}
    if setting.decoder != "full":
        out["decoder"] = setting.decoder
    if setting.cache_interval > 1:
        out["cache_interval"] = setting.cache_interval
    return out


def runtime_generator(bundle: str | Path) -> Generate:
    """Load ``bundle`` with the torch-free runtime and generate with it."""
    import runtime

    return pipeline_generator(runtime.Pipeline.load(bundle))


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians."""
    # tr((C1 C2)^(1/2)) = sum of sqrt(eigenvalues) of the symmetric C1^(1/2) C2 C1^(1/2).
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = float(np.sqrt(np.clip(cross, 0, None)).sum())
    return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features; needs N >= 2."""
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def inception_score(probs: list[np.ndarray]) -> float:
    """IS over the joint class of all heads, whose probability is the product of the heads'."""
    eps = 1e-12
    joint = probs[0]
    for p in probs[1:]:
        joint = (joint[:, :, None] * p[:, None, :]).reshape(len(joint), -1)
    marginal = joint.mean(axis=0, keepdims=True)
    kl = np.sum(joint * (np.log(joint + eps) - np.log(marginal + eps)), axis=1)
    return float(np.exp(kl.mean()))


def real_statistics(model: classifier.AttributeNet, n: int = 2000, seed: int = REAL_SEED) -> RealStatistics:
    """Feature Gaussian of ``n`` held-out dataset images."""
    images, _ = make_dataset(n, seed)
    return RealStatistics(*gaussian(classifier.predict(model, images)[0]))


def real_baseline_fid(model: classifier.AttributeNet, real: RealStatistics, n: int) -> float:
    """FID of ``n`` fresh dataset images against ``real``: what a perfect generator scores at this n."""
    images, _ = make_dataset(n, BASELINE_SEED)
    return frechet_distance(*gaussian(classifier.predict(model, images)[0]), real.mean, real.cov)


def prompt_set(n: int, seed: int) -> tuple[list[str], list[Attributes]]:
    """``n`` canonical prompts of random attributes, deterministic from ``seed``."""
    if n < 2:
        raise ValueError(f"need at least 2 images per setting (FID needs a covariance), got n={n}")
    rng = np.random.default_rng(seed)
    attributes = [sample_attributes(rng) for _ in range(n)]
    return [canonical_caption(a) for a in attributes], attributes


def _as_unit_float(images: np.ndarray, n: int) -> np.ndarray:
    images = np.asarray(images)
    expected = (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    if images.shape != expected:
        raise ValueError(f"the generator returned images of shape {images.shape}; expected {expected}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def score_images(
    images: np.ndarray, attributes: list[Attributes], model: classifier.AttributeNet, real: RealStatistics
) -> dict[str, float]:
    """Checker accuracy, classifier all-five accuracy, FID against ``real``, and IS."""
    result = checker.score(images, attributes)
    features, probs = classifier.predict(model, images)
    result["classifier_all"] = classifier.accuracy(classifier.classify(probs), attributes)["all"]
    result["fid"] = frechet_distance(*gaussian(features), real.mean, real.cov)
    result["is"] = inception_score(probs)
    return result


def evaluate_setting(
    generate: Generate,
    setting: Setting,
    prompts: list[str],
    attributes: list[Attributes],
    seed: int,
    model: classifier.AttributeNet,
    real: RealStatistics,
) -> tuple[dict[str, float], np.ndarray]:
    """Generate ``prompts`` under ``setting`` and score them; returns (metrics, images)."""
    start = time.perf_counter()
    images = _as_unit_float(generate(prompts, setting, seed), len(prompts))
    seconds = time.perf_counter() - start
    metrics = score_images(images, attributes, model, real)
    metrics["sec_per_image"] = seconds / len(prompts)
    return metrics, images


def markdown_table(rows: list[tuple[Setting, dict[str, float]]], n: int, baseline_fid: float) -> str:
    """One row per setting: sampler, steps, guidance, accuracies (%), FID, IS, sec/img."""
    note = f"{n} images per setting; real-vs-real FID at this n (the floor): {baseline_fid:.2f}\n\n"
    show = any(levers(s) for s, _ in rows)  # the decoder and cache columns, where a setting uses a lever
    header = "| scheduler | steps | guidance |" + (" decoder | cache |" if show else "")
    header += " bg | color | shape | size | position | all | clf all | FID | IS | sec/img |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for setting, m in rows:
        accuracies = " | ".join(f"{100 * m[k]:.1f}" for k in ACCURACIES)
        lines.append(
            f"| {setting.scheduler} | {setting.steps} | {setting.guidance:g} | "
            + (f"{setting.decoder} | {setting.cache_interval} | " if show else "")
            + f"{accuracies} "
            f"| {m['fid']:.2f} | {m['is']:.1f} | {m['sec_per_image']:.3f} |"
        )
    return note + "\n".join(lines) + "\n"


def summary_line(setting: Setting, m: dict[str, float]) -> str:
    """One printable line of a setting's metrics."""
    accuracies = " ".join(f"{k} {m[k]:.3f}" for k in ACCURACIES)
    return (
        f"{setting.scheduler} steps={setting.steps} guidance={setting.guidance:g}"
        + "".join(f" {k}={v}" for k, v in levers(setting).items())
        + f": {accuracies} | "
        f"FID {m['fid']:.2f} | IS {m['is']:.1f} | {m['sec_per_image']:.3f} s/img"
    )


def evaluate(
    generate: Generate,
    settings: list[Setting],
    n: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
    model: classifier.AttributeNet | None = None,
    real: RealStatistics | None = None,
    grid_n: int = 16,
    log: Callable[[str], None] = print,
) -> list[tuple[Setting, dict[str, float]]]:
    """Evaluate every setting on the same prompts; with ``out``, write results.md/.json and grids."""
    if not settings:
        raise ValueError("no settings to evaluate")
    model = classifier.load() if model is None else model
    real = real_statistics(model) if real is None else real
    prompts, attributes = prompt_set(n, seed)
    baseline = real_baseline_fid(model, real, n)
    log(f"real-vs-real FID at n={n}: {baseline:.2f}")
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in settings:
        metrics, images = evaluate_setting(generate, setting, prompts, attributes, seed, model, real)
        rows.append((setting, metrics))
        log(summary_line(setting, metrics))
        if out is not None:
            # Rewritten after every setting so a long run that dies keeps what it finished.
            write_results(out, rows, n, seed, baseline)
            if grid_n > 0:
                caption_grid(images[:grid_n], prompts[:grid_n]).save(out / f"grid_{setting.slug}.png")
    return rows


def write_results(out: Path, rows: list[tuple[Setting, dict[str, float]]], n: int, seed: int, baseline: float) -> None:
    """results.md (the table) and results.json (the same numbers, machine-readable) under ``out``."""
    atomic.write_text(out / "results.md", markdown_table(rows, n, baseline))
    records = [
        {"scheduler": s.scheduler, "steps": s.steps, "guidance": s.guidance, "decoder": s.decoder, "cache_interval": s.cache_interval, **m}
        for s, m in rows
    ]
    summary = {"n": n, "seed": seed, "real_baseline_fid": baseline, "results": records}
    atomic.write_json(out / "results.json", summary, indent=2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m reference.evaluate",
        description=__doc__.split("\n\n")[0] + " Every combination of --scheduler, --steps and --guidance is one setting.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="engine bundle folder (from python -m export.build)")
    parser.add_argument("--n", type=_positive_int, default=200, help="images per setting (default 200)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        nargs="+",
        default=[1.0, 3.0, 5.0, 8.0],
        help="classifier-free guidance scales to compare (default 1 3 5 8)",
    )
    parser.add_argument("--steps", type=_positive_int, nargs="+", default=[50], help="sampling step counts (default 50)")
    parser.add_argument("--scheduler", nargs="+", default=["ddim"], choices=sorted(SAMPLERS), help="runtime samplers (default ddim)")
    parser.add_argument(
        "--decoder", nargs="+", default=["full"], choices=("full", "tiny"), help="VAE decoders to compare (tiny: a --tiny-vae bundle)"
    )
    parser.add_argument(
        "--cache-interval", type=_positive_int, nargs="+", default=[1], help="DeepCache intervals to compare (> 1: a --deepcache bundle)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt and noise seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("results/eval"), help="output folder (default results/eval)")
    parser.add_argument("--weights", type=Path, default=classifier.DEFAULT_WEIGHTS, help="classifier weights")
    parser.add_argument("--real-n", type=_positive_int, default=2000, help="held-out real images for FID (default 2000)")
    parser.add_argument("--grid-n", type=int, default=16, help="generated images per grid PNG, 0 for none (default 16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI: evaluate a bundle over the requested settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error("--n must be at least 2 (FID needs a covariance)")
    combos = itertools.product(args.scheduler, args.steps, args.guidance_scale, args.decoder, args.cache_interval)
    settings = [Setting(*combo) for combo in combos]
    try:
        model = classifier.load(args.weights)
        generate = runtime_generator(args.bundle)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    real = real_statistics(model, n=args.real_n)
    try:
        evaluate(generate, settings, n=args.n, seed=args.seed, out=args.out, model=model, real=real, grid_n=args.grid_n)
    except ValueError as e:  # e.g. a sampler name the runtime does not know
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
