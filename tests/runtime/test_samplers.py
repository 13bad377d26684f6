"""Every sampler against its diffusers scheduler, step for step, plus the registry and bad-input errors.

diffusers runs its scheduler loop on the same closure model; the stochastic ones get exactly the
noise our rng draws (their module's `randn_tensor` is patched to hand out the same pre-drawn arrays).
"""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest

from runtime.sampling import (
    CLASS_DEFAULTS,
    DEFAULT_FOR_CLASS,
    SAMPLERS,
    default_sampler,
    draws_noise,
    get_sampler,
    noise_schedule,
    sampler_grid,
    sampler_options,
)
from tests.helpers.sampler_checks import (
    CONFIGS,
    NO_SAMPLE_PREDICTION,
    REFERENCE,
    SD15_JSON,
    SHAPE,
    assert_same_steps,
    full_step_done,
    toy_model,
    use_precise_schedule,
)

STOCHASTIC = {"ddpm", "euler_a", "lcm", "tcd"}
STEPS = {"lcm": (1, 2, 3, 4, 8), "tcd": (1, 2, 3, 4, 8)}


def run_ours(name, config, steps, options=None, seed=7):
    """Our sampler through the registry, recording the latents its callback sees after each step."""
    states = []
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    sampler, schedule = get_sampler(name), noise_schedule(config)
    record = lambda i, t, x: states.append(x.copy())  # noqa: E731
    out = sampler(toy_model, x, schedule, steps, rng=np.random.default_rng(seed), callback=record, **(options or {}))
    assert out is states[-1] or np.array_equal(out, states[-1])
    return states


def run_diffusers(name, config, steps, monkeypatch, options=None, seed=7, own_schedule=False):
    """diffusers' own denoising loop (as its pipelines run it), recording the latents after each full step.

    It runs in float64 on our float64 alphas_cumprod unless own_schedule: its float32 one holds 1 - alpha_bar
    near t=0 only to ~1e-4 (sigma_min of linear betas is 8e-5 off), which shifts Karras/exponential grids as much.
    """
    import diffusers
    import torch

    class_name, fixed = REFERENCE[name]
    ref = getattr(diffusers, class_name).from_config(config, **fixed)
    if not own_schedule:
        use_precise_schedule(ref, noise_schedule(config).as_class(class_name, **fixed).alphas_cumprod)
    ref.set_timesteps(steps)
    for attr in ("alphas_cumprod", "final_alpha_cumprod", "one", "sigmas"):
        if isinstance(getattr(ref, attr, None), torch.Tensor):  # float64 arithmetic on its schedule
            setattr(ref, attr, getattr(ref, attr).double())
    rng = np.random.default_rng(seed)
    pool = [torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32)) for _ in range(len(ref.timesteps) + 1)]
    monkeypatch.setattr(sys.modules[type(ref).__module__], "randn_tensor", lambda *a, **k: pool.pop(0).to(k["dtype"]), raising=False)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)).double() * ref.init_noise_sigma
    states = []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t).numpy().astype(np.float32)  # the network sees float32, as in a pipeline
        out = torch.from_numpy(toy_model(x_in, float(t))).double()
        x = ref.step(out, t, x, **(options or {})).prev_sample
        if full_step_done(name, ref, steps):
            states.append(x.numpy().copy())
    return states


CASES = [
    (name, config, steps)
    for name in SAMPLERS
    for config in CONFIGS
    for steps in STEPS.get(name, (1, 3, 7, 20))
    if not (config == "cosine-linspace-sample" and name in NO_SAMPLE_PREDICTION)
]


@pytest.mark.parametrize("name, config, steps", CASES)
def test_matches_diffusers_step_for_step(name, config, steps, monkeypatch):
    ours = run_ours(name, CONFIGS[config], steps)
    assert len(ours) == steps
    assert_same_steps(ours, run_diffusers(name, CONFIGS[config], steps, monkeypatch), f"{name}/{config}/{steps}")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("config", ["sd15-leading-eps", "sd15-as-shipped", "zero-snr-trailing-v"])
def test_matches_diffusers_own_float32_schedule_on_sd_configs(name, config, monkeypatch):
    """Also against diffusers' own (float32) alphas_cumprod, for the schedules SD checkpoints use."""
    for steps in STEPS.get(name, (4, 20))[-2:]:
        ours = run_ours(name, CONFIGS[config], steps)
        assert_same_steps(ours, run_diffusers(name, CONFIGS[config], steps, monkeypatch, own_schedule=True), f"{name}/{config}/{steps}")


SD15 = CONFIGS["sd15-leading-eps"]
V = CONFIGS["linear-trailing-v"]
ZSNR = CONFIGS["zero-snr-trailing-v"]
# (sampler, config, steps, sampler options = diffusers step() kwargs): config options and sampler options beyond the defaults
VARIANTS = [
    ("ddim", dict(SD15, thresholding=True, sample_max_value=3.0), 7, {}),
    ("ddim", SD15, 7, dict(eta=0.7)),
    ("ddim", dict(SD15, set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.8), 5, dict(eta=1.0)),
    ("ddpm", dict(SD15, variance_type="fixed_large"), 7, {}),
    ("ddpm", dict(V, thresholding=True, sample_max_value=2.0, timestep_spacing="linspace"), 5, {}),
    ("ddpm", dict(SD15, steps_offset=0), 4, {}),
    ("pndm", dict(SD15, skip_prk_steps=False), 4, {}),
    ("pndm", dict(SD15, skip_prk_steps=False), 7, {}),
    ("pndm", dict(V, skip_prk_steps=False), 20, {}),
    ("pndm", dict(V, timestep_spacing="linspace"), 7, {}),
    ("pndm", dict(SD15, set_alpha_to_one=True), 2, {}),
    ("euler", dict(SD15, use_karras_sigmas=True), 7, {}),
    ("euler", dict(V, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 7, {}),
    ("euler", dict(SD15, use_exponential_sigmas=True), 5, {}),
    ("euler", dict(SD15, interpolation_type="log_linear"), 7, {}),
    ("euler", dict(SD15, final_sigmas_type="sigma_min"), 3, {}),
    ("euler", dict(V, timestep_type="continuous"), 5, {}),
    ("euler", SD15, 7, dict(s_churn=1.0, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)),
    ("euler", dict(SD15, timestep_spacing="linspace"), 20, dict(s_churn=40.0)),
    ("euler", V, 5, dict(s_churn=2.0)),
    ("euler_a", dict(V, timestep_spacing="leading", steps_offset=1), 7, {}),
    ("heun", dict(SD15, use_karras_sigmas=True), 7, {}),
    ("heun", dict(ZSNR, use_exponential_sigmas=True, timestep_spacing="linspace"), 4, {}),
    ("heun", dict(CONFIGS["cosine-linspace-sample"], clip_sample=True, clip_sample_range=0.5), 5, {}),
    ("dpmpp_2m", dict(SD15, final_sigmas_type="sigma_min", lower_order_final=False), 20, {}),
    ("dpmpp_2m", dict(SD15, final_sigmas_type="sigma_min"), 7, {}),
    ("dpmpp_2m", dict(SD15, euler_at_final=True), 20, {}),
    ("dpmpp_2m", dict(V, use_lu_lambdas=True), 7, {}),
    ("dpmpp_2m", dict(V, use_exponential_sigmas=True), 7, {}),
    ("dpmpp_2m", dict(SD15, lambda_min_clipped=-2.0, timestep_spacing="trailing"), 7, {}),
    ("dpmpp_2m", dict(SD15, thresholding=True, sample_max_value=2.0, algorithm_type="sde-dpmsolver++", solver_order=3), 7, {}),
    ("dpmpp_2m", dict(CONFIGS["cosine-linspace-sample"], use_lu_lambdas=True), 5, {}),
    ("dpmpp_2m_karras", dict(V, sigma_min=0.2), 7, {}),
    ("dpmpp_2m_karras", dict(SD15, final_sigmas_type="sigma_min"), 20, {}),
    ("unipc", dict(SD15, solver_order=3), 7, {}),
    ("unipc", dict(SD15, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), 7, {}),
    ("unipc", dict(V, solver_order=1), 5, {}),
    ("unipc", dict(SD15, solver_type="bh1", final_sigmas_type="sigma_min"), 7, {}),
    ("unipc", dict(SD15, solver_type="midpoint", disable_corrector=[0, 2]), 7, {}),
    ("unipc", dict(SD15, use_karras_sigmas=True, final_sigmas_type="sigma_min"), 7, {}),
    ("unipc", dict(CONFIGS["cosine-linspace-sample"], use_karras_sigmas=True), 5, {}),
    ("unipc", dict(V, use_karras_sigmas=True, sigma_min=0.1, final_sigmas_type="sigma_min"), 5, {}),
    ("unipc", dict(V, use_exponential_sigmas=True, thresholding=True, sample_max_value=2.0), 7, {}),
    ("lcm", dict(SD15, original_inference_steps=25, timestep_scaling=5.0), 4, {}),
    ("lcm", dict(V, thresholding=True, sample_max_value=2.0), 4, {}),
    ("lcm", dict(SD15, clip_sample=True), 3, {}),
    ("tcd", SD15, 4, dict(eta=0.0)),
    ("tcd", V, 4, dict(eta=1.0)),
    ("tcd", ZSNR, 5, dict(eta=0.5)),
    ("tcd", dict(SD15, original_inference_steps=1000), 7, dict(eta=0.8)),  # floor(0.2 * 285): 57 in float32, 56 in float64
]


@pytest.mark.parametrize("name, config, steps, options", VARIANTS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VARIANTS)])
def test_config_and_option_variants_match_diffusers(name, config, steps, options, monkeypatch):
    ours = run_ours(name, config, steps, options)
    assert_same_steps(ours, run_diffusers(name, config, steps, monkeypatch, options), f"{name}/{config}/{options}")


def test_unipc_bh1_onto_sigma_zero_finishes_where_diffusers_gives_nan(monkeypatch):
    """diffusers multiplies B(h) = -inf by 0 on the last bh1 step; we take the limit, x0."""
    config = dict(SD15, solver_type="bh1")
    ours, theirs = run_ours("unipc", config, 7), run_diffusers("unipc", config, 7, monkeypatch)
    assert np.isnan(theirs[-1]).all() and np.isfinite(ours[-1]).all()
    assert_same_steps(ours[:-1], theirs[:-1], "unipc bh1")


def test_class_defaults_are_diffusers_init_defaults():
    import diffusers

    for class_name, defaults in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert defaults == {k: p.default for k, p in params.items() if k != "self"}, class_name


@pytest.mark.parametrize("class_name", sorted(CLASS_DEFAULTS))
def test_config_read_as_from_config_reads_it(class_name):
    """A PNDM config handed to another class: shared options kept, that class's defaults for the rest."""
    import diffusers

    for source in (SD15_JSON, ZSNR, dict(V, use_karras_sigmas=True, solver_order=3)):
        ref = getattr(diffusers, class_name).from_config(dict(source, _class_name="PNDMScheduler"))
        ours = noise_schedule(dict(source, _class_name="PNDMScheduler")).as_class(class_name)
        assert dict(ours.config) == {k: ref.config[k] for k in ours.config}
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=3e-6, atol=1e-9)


def test_every_step_count_gives_one_callback_per_step():
    for name in SAMPLERS:
        for steps in (1, 2, 4):
            seen = []
            sampler = get_sampler(name)
            record = lambda i, t, x: seen.append((i, x.dtype))  # noqa: E731, B023 (called before the iteration ends)
            sampler(toy_model, np.zeros(SHAPE, np.float32), noise_schedule(SD15), steps, rng=np.random.default_rng(0), callback=record)
            assert seen == [(i, np.float32) for i in range(steps)], name


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_each_grid_is_the_timesteps_its_sampler_runs(config):
    """The table's grid, computed as data from the schedule and the step count, is the timestep each step's callback
    reports, for every sampler, config and step count a run accepts (a hand-off is placed on it without a dry run)."""
    checked = 0
    for name in SAMPLERS:
        for steps in (1, 2, 3, 4, 10, 25):
            schedule, seen = noise_schedule(CONFIGS[config]), []
            try:
                get_sampler(name)(
                    toy_model, np.zeros(SHAPE, np.float32), schedule, steps, rng=np.random.default_rng(0),
                    callback=lambda i, t, x: seen.append(float(t)),  # noqa: B023 (called before the iteration ends)
                )  # fmt: skip
            except ValueError:
                continue  # a config or step count this sampler refuses
            assert sampler_grid(name, schedule, steps) == seen, (name, steps)
            checked += 1
    assert checked >= 40


class Tally:
    """A generator that counts the draws made from it."""

    def __init__(self) -> None:
        self.draws, self._rng = 0, np.random.default_rng(0)

    def __getattr__(self, name: str):
        self.draws += 1
        return getattr(self._rng, name)


@pytest.mark.parametrize(
    "name, options",
    [(name, {}) for name in sorted(SAMPLERS)] + [("ddim", dict(eta=0.5)), ("tcd", dict(eta=0.0)), ("euler", dict(s_churn=1.0))],
)
def test_draws_noise_says_whether_a_run_draws(name, options):
    """The table's noise flag against a run that counts its draws: a server batches only the samplers that draw none."""
    tally = Tally()
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    get_sampler(name)(toy_model, x, noise_schedule(SD15), 4, rng=tally, **options)
    assert draws_noise(name, options) == (tally.draws > 0)


def test_deterministic_samplers_never_touch_the_rng():
    for name, options in [(n, {}) for n in SAMPLERS if n not in STOCHASTIC] + [("tcd", dict(eta=0.0))]:
        rng = np.random.default_rng(3)
        before = rng.bit_generator.state
        get_sampler(name)(toy_model, np.ones(SHAPE, np.float32), noise_schedule(SD15), 3, rng=rng, **options)
        assert rng.bit_generator.state == before, name


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ddpm", {}, "ddpm draws noise: pass rng=np.random.default_rng"),
        ("euler_a", {}, "euler_a draws noise: pass rng"),
        ("lcm", {}, "lcm draws noise: pass rng"),
        ("tcd", {}, r"tcd with eta > 0 draws noise: pass rng"),
        ("ddim", dict(eta=0.5), r"ddim with eta > 0 draws noise: pass rng"),
        ("euler", dict(s_churn=1.0), r"euler with s_churn > 0 draws noise: pass rng"),
    ],
)
def test_stochastic_samplers_need_an_rng(name, options, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        get_sampler(name)(lambda x, t: calls.append(t) or x, np.zeros(SHAPE, np.float32), noise_schedule(SD15), 4, **options)
    assert calls == []  # refused before any model call


def test_same_rng_seed_same_result_and_seeds_differ():
    for name in STOCHASTIC:
        a, b, c = (run_ours(name, SD15, 4, seed=s)[-1] for s in (1, 1, 2))
        assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-3, name


def test_registry_names_and_defaults():
    import diffusers

    assert sorted(SAMPLERS) == sorted(REFERENCE)
    assert all(hasattr(diffusers, c) for c in DEFAULT_FOR_CLASS) and set(DEFAULT_FOR_CLASS.values()) <= set(SAMPLERS)
    assert default_sampler("PNDMScheduler", SD15_JSON) == "pndm"
    assert default_sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert default_sampler("DPMSolverMultistepScheduler", {}) == "dpmpp_2m"
    assert default_sampler("LMSDiscreteScheduler", {}) == "ddim" and default_sampler(None) == "ddim"
    assert sampler_options("ddim") == ("eta",) and sampler_options("tcd") == ("eta",) and sampler_options("heun") == ()
    assert sampler_options("euler") == ("s_churn", "s_tmin", "s_tmax", "s_noise")


SAMPLE = CONFIGS["cosine-linspace-sample"]
BAD_REQUESTS = [  # (sampler, config, steps, options, the error it must raise)
    ("euler", SD15, 3, dict(eta=0.5), r"sampler 'euler' has no option eta; its options are s_churn, s_tmin, s_tmax, s_noise"),
    ("heun", SD15, 3, dict(eta=0.5, gamma=1), r"sampler 'heun' has no option eta, gamma; it takes no options"),
    ("tcd", SD15, 3, dict(eta=1.5), r"tcd: eta \(the paper's gamma\) must be between 0"),
    ("ddim", SD15, 3, dict(eta=-1.0), r"ddim: eta must be >= 0"),
    ("euler_a", SAMPLE, 3, {}, r"euler_a: scheduler config prediction_type='sample' is not supported "
                               r"\(supported: 'epsilon', 'v_prediction'\)"),
    ("pndm", SAMPLE, 3, {}, r"pndm: scheduler config prediction_type='sample' is not supported"),
    ("pndm", dict(SD15, skip_prk_steps=False), 3, {}, r"pndm with skip_prk_steps=False needs at least 4 steps"),
    ("ddpm", dict(SD15, variance_type="learned_range"), 3, {}, r"ddpm: scheduler config variance_type='learned_range' is not supported"),
    ("euler", dict(SD15, use_karras_sigmas=True, use_exponential_sigmas=True), 3, {},
     r"euler: scheduler config turns on use_karras_sigmas and"),
    ("dpmpp_2m", dict(SD15, use_beta_sigmas=True), 3, {}, r"dpmpp_2m: scheduler config use_beta_sigmas=True is not supported"),
    ("euler", dict(SD15, interpolation_type="cubic"), 3, {}, r"euler: scheduler config interpolation_type 'cubic' is not one of"),
    ("euler", dict(SD15, final_sigmas_type="one"), 3, {}, r"euler: scheduler config final_sigmas_type 'one' is not one of"),
    ("unipc", dict(SD15, lower_order_final=False), 3, {}, r"unipc: lower_order_final=False with final_sigmas_type='zero' divides by zero"),
    ("unipc", dict(SD15, predict_x0=False), 3, {}, r"unipc: scheduler config predict_x0=False is not supported"),
    ("lcm", SD15, 51, {}, r"steps \(51\) cannot exceed the scheduler config's original_inference_steps \(50\)"),
    ("euler", SD15, 0, {}, r"steps must be between 1 and the model's 1000 training timesteps, got 0"),
    ("dpmpp_2m", SD15, 2.5, {}, r"steps must be a whole number, got 2.5"),
]  # fmt: skip


@pytest.mark.parametrize("name, config, steps, options, message", BAD_REQUESTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_refused_by_message(name, config, steps, options, message):
    with pytest.raises(ValueError, match=message):
        run_ours(name, config, steps, options)


def test_unknown_names_are_refused_by_message():
    with pytest.raises(ValueError, match=r"unknown sampler 'k_lms'; choose one of: ddim, ddpm, dpmpp_2m, dpmpp_2m_karras, euler"):
        get_sampler("k_lms")
    with pytest.raises(ValueError, match=r"scheduler class 'LMSDiscreteScheduler' is not one of DDPMScheduler, DDIMScheduler"):
        noise_schedule(SD15, "LMSDiscreteScheduler")
