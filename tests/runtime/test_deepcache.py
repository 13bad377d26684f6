"""--deepcache and cache_interval=N: the runtime's feature caching equals DeepCache's own algorithm (the deepcache
package's DeepCacheSDHelper on the diffusers pipeline, Ma et al. 2024) on the same model and noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.errors import BundleError
from runtime.pipeline import initial_latents
from tests.helpers.tiny_models import make_tiny_sd
from tests.runtime.test_edit_pipelines import IMAGE, MASK, PROMPT, SCHEDULERS, diffusers_pipe, draws, patch_diffusers_noise

STEPS = 8


def build_cached(model: Path, out: Path, **choices) -> Path:
    from export.build import build

    return build(model, out, precision="fp32", deepcache=0, log=lambda _: None, **choices)


@pytest.fixture(scope="module")
def cached_bundle(tiny_model, tmp_path_factory) -> Path:
    return build_cached(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-deepcache")


def deepcached(pipe, interval: int, branch: int = 0):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return pipe


def test_shallow_unet_on_the_same_step_reproduces_the_full_unet(tiny_model):
    """The shallow UNet fed the feature of the same input is the full UNet, exactly: the cut is in the right place."""
    import torch
    from diffusers import UNet2DConditionModel

    from export.deepcache import full_with_feature, shallow_forward

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        for branch in (0, 1):
            out, feature = full_with_feature(unet, branch, lambda: unet(x, t, encoder_hidden_states=ctx).sample)
            again = shallow_forward(unet, branch, x, t, ctx, feature, {})
            assert torch.allclose(out, again, atol=1e-5), branch


TXT2IMG_CASES = [("ddim", 3, 7.5), ("euler", 2, 3.0), ("dpmpp_2m", 5, 7.5)]
ONE_CALL_CASES = [("ddpm", 2, None), ("euler_a", 3, None), ("dpmpp_2m_karras", 2, None), ("unipc", 3, None), ("tcd", 2, 0.3)]


@pytest.mark.parametrize("sampler, interval, guidance", TXT2IMG_CASES)
def test_txt2img_matches_deepcache_on_diffusers(tiny_model, cached_bundle, sampler, interval, guidance):
    import torch

    pipe = runtime.Pipeline.load(cached_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=11)
    ours = pipe.txt2img(
        PROMPT, steps=STEPS, scheduler=sampler, guidance_scale=guidance, latents=latents, output_type="np", cache_interval=interval
    )
    ref = deepcached(diffusers_pipe("StableDiffusionPipeline", tiny_model, SCHEDULERS[sampler]), interval)(
        PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.txt2img(PROMPT, steps=STEPS, scheduler=sampler, guidance_scale=guidance, latents=latents, output_type="np")
    assert np.abs(plain - ours).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"


@pytest.mark.parametrize("sampler, interval, eta", ONE_CALL_CASES)
def test_the_other_one_call_samplers_match_deepcache_on_diffusers(tiny_model, cached_bundle, sampler, interval, eta, monkeypatch):
    """The samplers with one UNet call per step and no repeated timestep, those DeepCacheSDHelper counts as we do;
    the noise-drawing ones get our rng's draws in diffusers' scheduler (TCD at gamma 0.3, which draws). (Heun and PNDM
    repeat timesteps, which the helper counts by their first index, so its schedule is not the paper's per-step one:
    see the test below.)"""
    import sys

    import diffusers
    import torch

    from tests.helpers.sampler_checks import REFERENCE

    pipe = runtime.Pipeline.load(cached_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=11)
    options = {} if eta is None else {"eta": eta}
    ours = pipe.txt2img(
        PROMPT, steps=STEPS, scheduler=sampler, seed=3, latents=latents, output_type="np", cache_interval=interval, **options
    )
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model, "DDIMScheduler")
    class_name, fixed = REFERENCE[sampler]
    ref.scheduler = getattr(diffusers, class_name).from_config(ref.scheduler.config, **fixed)
    rng = np.random.default_rng(3)  # the steps' noise: what our sampler drew, in order
    draw = lambda shape, **k: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(k["dtype"])  # noqa: E731
    monkeypatch.setattr(sys.modules[type(ref.scheduler).__module__], "randn_tensor", draw, raising=False)
    ref = deepcached(ref, interval)(
        PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np", **options
    ).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.txt2img(PROMPT, steps=STEPS, scheduler=sampler, seed=3, latents=latents, output_type="np", **options)
    assert np.abs(plain - ours).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"


# the step each UNet call belongs to: Heun's two calls a step; PNDM's Runge-Kutta warm-up (skip_prk_steps is off in
# the tiny model's config, as in diffusers' PNDMScheduler defaults) of 3 steps of 4 calls, then one call a step
STEP_OF_CALL = {"heun": lambda call: call // 2, "pndm": lambda call: call // 4 if call < 12 else call - 9}


@pytest.mark.parametrize("sampler", sorted(STEP_OF_CALL))
def test_samplers_with_repeated_timesteps_match_deepcache_counting_our_steps(tiny_model, cached_bundle, sampler):
    """Samplers that call the UNet more than once in a step list a timestep more than once, and DeepCacheSDHelper
    numbers a call by the first index of its timestep in the scheduler's list, which is no step count there; with its
    step counted as ours (every call of a full step full), its block caching gives our image."""
    import torch
    from DeepCache import DeepCacheSDHelper

    class PerStep(DeepCacheSDHelper):
        def wrap_unet_forward(self):
            forward, calls = self.pipe.unet.forward, [0]
            self.function_dict["unet_forward"] = forward

            def counted(*args, **kwargs):
                self.cur_timestep, calls[0] = STEP_OF_CALL[sampler](calls[0]), calls[0] + 1
                return forward(*args, **kwargs)

            self.pipe.unet.forward = counted

    pipe = runtime.Pipeline.load(cached_bundle)
    latents = initial_latents(pipe.manifest.latent_shape, seed=11)
    ours = pipe.txt2img(PROMPT, steps=STEPS, scheduler=sampler, latents=latents, output_type="np", cache_interval=2)
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model, {"heun": "HeunDiscreteScheduler", "pndm": "PNDMScheduler"}[sampler])
    helper = PerStep(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    ref = ref(PROMPT, num_inference_steps=STEPS, latents=torch.from_numpy(latents), output_type="np").images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.txt2img(PROMPT, steps=STEPS, scheduler=sampler, latents=latents, output_type="np")
    assert np.abs(plain - ours).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"


def test_img2img_and_inpaint_match_deepcache_on_diffusers(tiny_model, cached_bundle, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inpaint_module

    pipe = runtime.Pipeline.load(cached_bundle)
    noise, encoder_noise = draws(pipe.manifest.latent_shape)
    draws_ = dict(encoder_noise=encoder_noise, output_type="np")
    ours = pipe.img2img(PROMPT, IMAGE, steps=STEPS, strength=0.7, noise=noise, cache_interval=2, **draws_)
    patch_diffusers_noise(monkeypatch, img2img_module, noise, encoder_noise)
    ref = deepcached(diffusers_pipe("StableDiffusionImg2ImgPipeline", tiny_model, "DDIMScheduler"), 2)(
        PROMPT, image=IMAGE, strength=0.7, num_inference_steps=STEPS, output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3
    ours = pipe.inpaint(
        PROMPT, IMAGE, MASK, steps=STEPS, latents=noise, encoder_noise=encoder_noise, output_type="np", cache_interval=3, composite=False
    )
    patch_diffusers_noise(monkeypatch, inpaint_module, noise, encoder_noise)
    ref = deepcached(diffusers_pipe("StableDiffusionInpaintPipeline", tiny_model, "DDIMScheduler"), 3)(
        PROMPT, image=IMAGE, mask_image=MASK, num_inference_steps=STEPS, output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_guidance_embedded_and_none_match_deepcache_on_diffusers(tmp_path, monkeypatch):
    import torch
    from diffusers.schedulers import scheduling_lcm

    lcm = make_tiny_sd(tmp_path / "lcm", kind="lcm")
    pipe = runtime.Pipeline.load(build_cached(lcm, tmp_path / "b-lcm"))
    latents = initial_latents(pipe.manifest.latent_shape, seed=2)
    ours = pipe.txt2img(PROMPT, steps=6, guidance_scale=6.0, seed=4, latents=latents, output_type="np", cache_interval=2)
    rng = np.random.default_rng(4)  # the LCM steps' noise: what our sampler drew, in order
    draw = lambda shape, **_: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))  # noqa: E731
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", draw)
    ref = deepcached(diffusers_pipe("LatentConsistencyModelPipeline", lcm, "LCMScheduler"), 2)(
        PROMPT, num_inference_steps=6, guidance_scale=6.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3
    sd = make_tiny_sd(tmp_path / "sd", seed=1)
    pipe = runtime.Pipeline.load(build_cached(sd, tmp_path / "b-none", guidance="none"))
    ours = pipe.txt2img(PROMPT, steps=6, guidance_scale=1.0, latents=latents, output_type="np", cache_interval=3)
    ref = deepcached(diffusers_pipe("StableDiffusionPipeline", sd, "DDIMScheduler"), 3)(
        PROMPT, num_inference_steps=6, guidance_scale=1.0, latents=torch.from_numpy(latents), output_type="np"
    ).images
    assert np.abs(ours - ref).max() <= 1e-3


def test_a_two_chunk_prompt_matches_deepcache_on_diffusers(tiny_model, tmp_path):
    """A long-prompt bundle (--max-prompt-tokens 150): DeepCache's UNets take the UNet's stepped context, and a 2-chunk
    prompt cached every other step equals DeepCacheSDHelper on diffusers fed compel's chunked embeddings (as
    test_long_prompts does)."""
    import torch
    from compel import Compel
    from compel.embeddings_provider import SplitLongTextMode

    from export.tensorrt.trtexec import bundle_commands
    from tests.runtime.test_long_prompts import LONG

    bundle = build_cached(tiny_model, tmp_path / "long", max_prompt_tokens=150, pipelines="txt2img")
    pipe = runtime.Pipeline.load(bundle)
    lines = {c.component: c.build for c in bundle_commands(bundle, engine_dir=tmp_path / "e")}
    for name in ("unet", "unet_deepcache", "unet_shallow"):
        assert pipe.manifest.components[name].input("encoder_hidden_states").steps == (0, 77, 0)
        # trtexec's profile as the Python builder's: from one chunk, tuned there, up to two
        least, most = "encoder_hidden_states:2x77x32", "encoder_hidden_states:2x154x32"
        assert [f"--minShapes={least}", f"--optShapes={least}", f"--maxShapes={most}"] == lines[name][3:6], name
    latents = initial_latents(pipe.manifest.latent_shape, seed=11)
    ours = pipe.txt2img(LONG, steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np", cache_interval=2)
    ref = diffusers_pipe("StableDiffusionPipeline", tiny_model, "DDIMScheduler")
    compel = Compel(
        tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False, split_long_text_mode=SplitLongTextMode.BRUTAL
    )
    with torch.no_grad():
        positive, negative = compel.pad_conditioning_tensors_to_same_length([compel(LONG), compel("")])
    assert positive.shape == (1, 154, 32)
    ref = deepcached(ref, 2)(
        prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=STEPS, guidance_scale=7.5,
        latents=torch.from_numpy(latents), output_type="np",
    ).images  # fmt: skip
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() <= 1e-3
    plain = pipe.txt2img(LONG, steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np")
    assert np.abs(plain - ours).max() > 1e-3, "caching changed nothing: the shallow UNet never ran"
    short = pipe.txt2img(PROMPT, steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np", cache_interval=2)
    assert np.abs(short - ours).max() > 0.01, "the second chunk made no difference: the comparison would prove nothing"


def test_every_sampler_has_a_deepcache_parity_test():
    """A sampler added to the runtime is compared with DeepCache here too (lcm: the guidance-embedding test)."""
    from runtime.sampling import SAMPLERS

    covered = {case[0] for case in TXT2IMG_CASES + ONE_CALL_CASES} | set(STEP_OF_CALL) | {"lcm"}
    assert covered == set(SAMPLERS)


def test_a_bundle_without_deepcache_says_how_to_build_it(bundle_fp32):
    pipe = runtime.Pipeline.load(bundle_fp32)
    with pytest.raises(BundleError, match=r"no DeepCache UNets .* `python -m export.build .*--deepcache 0"):
        pipe.txt2img(PROMPT, steps=2, cache_interval=3)
    with pytest.raises(ValueError, match="cache_interval must be a whole number >= 1"):
        pipe.txt2img(PROMPT, steps=2, cache_interval=0)
    assert pipe.txt2img(PROMPT, steps=1, cache_interval=1, output_type="np").shape == (1, 64, 64, 3)


def test_tensorrt_engines_are_built_for_the_deepcache_unets_too(cached_bundle, tmp_path, monkeypatch):
    """--from-onnx builds every component the bundle has (the TensorRT builder stood in for, as in test_tensorrt_offline);
    loaded with cuda_graph=True on the stand-in GPU (tests/helpers/fake_tensorrt.py), the pair replays CUDA graphs too."""
    from runtime.bundle import load_manifest
    from tests.export.test_tensorrt_offline import offline_build
    from tests.helpers import fake_tensorrt
    from tests.runtime.test_tensorrt_rtx_runtime import deep_unet, shallow_unet

    bundle = offline_build(cached_bundle, tmp_path / "trt")
    manifest = load_manifest(bundle)
    assert {"unet_deepcache", "unet_shallow"} <= set(manifest.components)
    assert all(c.format == "plan" and c.verification["passed"] for c in manifest.components.values())
    assert manifest.levers.deepcache is not None and manifest.levers.deepcache.branch == 0
    computes = {"unet_deepcache": deep_unet, "unet_shallow": shallow_unet}
    plans = {}
    for name, c in manifest.components.items():
        (bundle / c.file).write_bytes(fake_tensorrt.FAKE_PLAN + name.encode())
        tensors = {t.name: (t.shape, t.dtype) for t in (*c.inputs, *c.outputs)}
        plans[fake_tensorrt.FAKE_PLAN + name.encode()] = (tensors, computes.get(name, lambda bound: {}))  # others: loaded, not run
    gpu = fake_tensorrt.Gpu()  # the Orin offline_build recorded
    fake_tensorrt.install(monkeypatch, gpu, {}, plans=plans)
    pipe = runtime.Pipeline.load(bundle, verify=False, cuda_graph=True)  # verify=False: the plans were swapped for the stand-in's
    cached = pipe.cached_unet(2)
    assert cached.deep.uses_cuda_graph and cached.shallow.uses_cuda_graph
    rng = np.random.default_rng(0)
    launches = gpu.launches
    for _ in range(3):
        feed = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in manifest.components["unet"].inputs}
        cached(feed)
        cached.step_done()
    assert cached.calls == {"full": 2, "shallow": 1} and gpu.launches == launches + 3
    pipe.close()


def test_each_onnxruntime_session_waits_as_its_next_call_comes(cached_bundle):
    """Idle workers: the UNet's and the deep UNet's spin for their next run, the shallow UNet's stop at the end of each
    run (the deep one's long run follows), once-per-image components' sleep. Read back from ONNX Runtime's sessions."""
    from runtime.backends.onnxruntime import OrtEngine

    def entry(name: str, key: str) -> str | None:
        options = pipe.engine(name).session.get_session_options()
        try:
            return options.get_session_config_entry(f"session.{key}")
        except Exception:  # ORT raises its own untyped error for an unset key
            return None

    with runtime.Pipeline.load(cached_bundle) as pipe:
        waits = {n: (entry(n, "intra_op.allow_spinning"), entry(n, "force_spinning_stop")) for n in pipe.manifest.components}
    assert waits == {
        "text_encoder": ("0", None), "vae_decoder": ("0", None), "vae_encoder": ("0", None),
        "unet": (None, None), "unet_deepcache": (None, None), "unet_shallow": (None, "1"),
    }
    component = runtime.load_manifest(cached_bundle).components["unet"]
    with pytest.raises(ValueError, match="spin='sometimes': choose one of always, in-run, never"):
        OrtEngine(component, cached_bundle / component.file, spin="sometimes")  # type: ignore[arg-type]
