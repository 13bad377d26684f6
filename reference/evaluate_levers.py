"""Score the speed levers on a shapes bundle: every cache interval, and each setting's latents decoded by every decoder.

    python -m reference.evaluate_levers --bundle B --n 200 --scheduler ddim --steps 50 20 --cache-interval 1 2 3 5 \\
        --decoder full tiny --out results/speed-levers/teacher

As reference.evaluate (same canonical prompts, noise, metrics and results.md/.json), except that one
generation per (sampler, steps, guidance, cache interval) makes the final latents, and each decoder
then decodes the same latents: the decoders compare on identical inputs, and the denoising is paid
once. sec/img = the denoising's time (timed) + that decoder's time (timed), per image; decode_sec/img
and the UNet calls per image (full and shallow, for samplers that call the UNet once a step) are
added to results.json. The final latents are saved (latents_*.npy), so that --latents-from can
decode them again with another decoder.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from reference import classifier
from reference.dataset import caption_grid
from reference.evaluate import (
    Setting,
    _as_unit_float,
    _positive_int,
    levers,
    pipeline_generator,
    prompt_set,
    real_baseline_fid,
    real_statistics,
    score_images,
    summary_line,
    write_results,
)
from runtime.sampling import SAMPLERS


def unet_calls(steps: int, interval: int) -> dict[str, int]:
    """Per image, for a sampler with one UNet call a step: full calls on steps 0, N, 2N, ..., shallow ones between."""
    full = math.ceil(steps / interval)
    return {"unet_calls_full": full, "unet_calls_shallow": steps - full}


def earlier_denoise(folder: Path, setting: Setting) -> float:
    """Seconds per image the denoising of `setting` took in the run that wrote `folder`."""
    import json

    wanted = (setting.scheduler, setting.steps, setting.guidance, setting.cache_interval)
    for r in json.loads((folder / "results.json").read_text())["results"]:
        if (r["scheduler"], r["steps"], r["guidance"], r["cache_interval"]) == wanted:
            return float(r["denoise_sec_per_image"])
    raise ValueError(f"{folder / 'results.json'} has no row for {setting.slug}")


def evaluate_levers(
    pipe: Any, settings: list[Setting], decoders: list[str], n: int, seed: int, out: Path, model: Any, real: Any,
    latents_from: Path | None = None,
) -> list[tuple[Setting, dict[str, float]]]:  # fmt: skip
    prompts, attributes = prompt_set(n, seed)
    baseline = real_baseline_fid(model, real, n)
    print(f"real-vs-real FID at n={n}: {baseline:.2f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    generate = pipeline_generator(pipe, output_type="latent")
    rows: list[tuple[Setting, dict[str, float]]] = []
    for setting in settings:
        if latents_from is None:
            start = time.perf_counter()
            latents = generate(prompts, setting, seed)
            denoise = time.perf_counter() - start
            np.save(out / f"latents_{setting.slug}.npy", latents)
        else:  # an earlier run's latents and its denoising time: only the decoders run again
            latents, denoise = np.load(latents_from / f"latents_{setting.slug}.npy"), earlier_denoise(latents_from, setting) * n
        for decoder in decoders:
            start = time.perf_counter()
            images = np.concatenate([pipe.decode(latents[i : i + pipe.batch_size], decoder) for i in range(0, n, pipe.batch_size)])
            decode = time.perf_counter() - start
            row = Setting(setting.scheduler, setting.steps, setting.guidance, decoder, setting.cache_interval)
            metrics = score_images(_as_unit_float(images[:n], n), attributes, model, real)
            metrics.update(sec_per_image=(denoise + decode) / n, decode_sec_per_image=decode / n, denoise_sec_per_image=denoise / n)
            metrics.update(unet_calls(setting.steps, setting.cache_interval))
            rows.append((row, metrics))
            print(summary_line(row, metrics) + f" | decode {decode / n * 1e3:.2f} ms/img", flush=True)
            write_results(out, rows, n, seed, baseline)  # after every row: a long run that dies keeps what it finished
            caption_grid(images[:16], prompts[:16]).save(out / f"grid_{row.slug}.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reference.evaluate_levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="engine bundle (--tiny-vae for decoder tiny, --deepcache for intervals > 1)")
    p.add_argument("--n", type=_positive_int, default=200, help="images per setting (default 200)")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=[5.0], help="guidance scales (default 5)")
    p.add_argument("--steps", type=_positive_int, nargs="+", default=[50], help="sampling step counts (default 50)")
    p.add_argument("--scheduler", nargs="+", default=["ddim"], choices=sorted(SAMPLERS), help="runtime samplers (default ddim)")
    p.add_argument("--cache-interval", type=_positive_int, nargs="+", default=[1], help="DeepCache intervals (default 1)")
    p.add_argument("--decoder", nargs="+", default=["full", "tiny"], choices=("full", "tiny"), help="decoders (default full tiny)")
    p.add_argument("--seed", type=int, default=0, help="prompt and noise seed (default 0)")
    p.add_argument("--out", type=Path, default=Path("results/speed-levers/eval"), help="output folder")
    p.add_argument(
        "--latents-from",
        type=Path,
        metavar="DIR",
        help="decode the final latents an earlier run saved in DIR (its latents_*.npy) instead of generating them again",
    )
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be at least 2 (FID needs a covariance)")
    import runtime

    combos = itertools.product(args.scheduler, args.steps, args.guidance_scale, ["full"], args.cache_interval)
    settings = [Setting(*combo) for combo in combos]
    model = classifier.load()
    with runtime.Pipeline.load(args.bundle) as pipe:
        for s in settings:  # a lever the bundle lacks is refused before an hour of generation, not after
            pipe.txt2img("a red circle", steps=1, output_type="latent", **levers(s))
        for d in args.decoder:
            pipe.decode(np.zeros(pipe.manifest.latent_shape, np.float32), d)
        evaluate_levers(pipe, settings, args.decoder, args.n, args.seed, args.out, model, real_statistics(model), args.latents_from)
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
