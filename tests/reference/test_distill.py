"""Latent consistency distillation: the pieces against diffusers' LCM, and a real (quick) run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import runtime
from export.build import build
from reference import lcd
from reference.distill import SHARED, main, student_from
from tests.helpers import REPO
from tests.helpers.attribute_checks import WANTED, attribute_hits
from tests.helpers.close import assert_close

TEACHER = REPO / "models" / "shapes-ldm"
PROMPT = "a large red circle in the top left on a black background"


def test_solver_steps_are_lcm_schedulers_origin_steps():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(original_inference_steps=50)
    solver = lcd.Solver.from_alphas(scheduler.alphas_cumprod, 50)
    scheduler.set_timesteps(50)
    assert solver.timesteps.tolist() == sorted(scheduler.timesteps.tolist())
    assert solver.previous[0] == 0 and (solver.timesteps[:-1] == solver.previous[1:]).all()
    with pytest.raises(ValueError, match=r"DDIM solver steps must be in \[1, 1000\], got 0"):
        lcd.Solver.from_alphas(scheduler.alphas_cumprod, 0)


def test_boundary_scalings_and_guidance_embedding_match_diffusers():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler()
    for t in (0, 19, 499, 999):
        c_skip, c_out = lcd.boundary_scalings(torch.tensor([t]))
        want_skip, want_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert math.isclose(float(c_skip), float(want_skip), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(c_out), float(want_out), rel_tol=1e-9, abs_tol=1e-12)
    w = torch.tensor([1.0, 4.5, 7.0])
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=64)
    assert torch.allclose(lcd.guidance_embedding(w, 64), want, atol=1e-6)


def test_x0_eps_round_trip_and_ddim_step():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = torch.tensor([0.9, 0.2], dtype=torch.float64)
    x = lcd._bcast(abar.sqrt(), x0) * x0 + lcd._bcast((1 - abar).sqrt(), x0) * eps
    got_x0, got_eps = lcd.x0_and_eps(eps, x, abar, "epsilon")
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.equal(got_eps, eps)
    v = lcd._bcast(abar.sqrt(), x0) * eps - lcd._bcast((1 - abar).sqrt(), x0) * x0
    vx0, veps = lcd.x0_and_eps(v, x, abar, "v_prediction")
    assert torch.allclose(vx0, x0, atol=1e-5) and torch.allclose(veps, eps, atol=1e-5)
    assert torch.allclose(lcd.ddim_step(x0, eps, abar), x, atol=1e-6)  # stepping to the same level is the identity
    with pytest.raises(ValueError, match="prediction type 'sample' is not supported"):
        lcd.x0_and_eps(v, x, abar, "sample")


def test_student_starts_as_the_teacher():
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(TEACHER / "unet").eval()
    student = student_from(teacher, 64).eval()
    assert student.config.time_cond_proj_dim == 64
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    context = torch.randn(1, 77, 64)
    with torch.no_grad():
        want = teacher(x, t, encoder_hidden_states=context).sample
        got = student(x, t, encoder_hidden_states=context, timestep_cond=lcd.guidance_embedding(torch.tensor([4.0]), 64)).sample
    assert_close(got.numpy(), want.numpy(), "the student at its start vs the teacher")  # a zero cond_proj adds 0


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("lcm") / "student"
    main(["--teacher", str(TEACHER), "--out", str(out), "--quick", "--device", "cpu"])
    return out


def test_quick_run_writes_an_lcm_folder_sharing_the_teachers_parts(student):
    for name in SHARED:
        files = sorted(p.relative_to(TEACHER / name) for p in (TEACHER / name).rglob("*") if p.is_file())
        assert files and all((student / name / f).read_bytes() == (TEACHER / name / f).read_bytes() for f in files)
    log = json.loads((student / "distill_log.json").read_text())
    assert log["status"] == "complete" and log["checkpoints"][-1]["step"] == 6
    assert {f"accuracy_4_steps_{k}" for k in ("color", "position", "all")} <= set(log["checkpoints"][-1])
    listed = {line.split()[1] for line in (student / "SHA256SUMS").read_text().splitlines()}
    assert {"unet/diffusion_pytorch_model.safetensors", "distill_log.json", "vae/config.json"} <= listed
    assert json.loads((student / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"


def test_resume_continues_the_step_count(student, tmp_path, capsys):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(student, out)
    main(["--teacher", str(TEACHER), "--out", str(out), "--quick", "--device", "cpu", "--resume", "--steps", "8"])
    assert "[resume] from step 6" in capsys.readouterr().out
    assert json.loads((out / "distill_log.json").read_text())["checkpoints"][-1]["step"] == 8


def test_exported_student_matches_diffusers_lcm_pipeline(student, tmp_path, monkeypatch):
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.schedulers import scheduling_lcm

    bundle = build(student, tmp_path / "bundle", precision="fp32", log=lambda _: None)
    pipe = runtime.Pipeline.load(bundle)
    assert pipe.manifest.guidance_info.mode == "embedded"
    latents = np.random.default_rng(3).standard_normal(pipe.manifest.latent_shape, dtype=np.float32)
    steps: list[int] = []
    ours = pipe.txt2img(PROMPT, guidance_scale=5.0, seed=7, latents=latents, output_type="np", callback=lambda i, t, x: steps.append(i))
    assert len(steps) == 4  # an LCM bundle defaults to 4 steps

    rng = np.random.default_rng(7)  # the noise our LCM sampler drew, in order
    monkeypatch.setattr(
        scheduling_lcm, "randn_tensor", lambda shape, **_: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))
    )
    ref_pipe = LatentConsistencyModelPipeline.from_pretrained(student, safety_checker=None)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np").images
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{teacher}"], "--out is the teacher's folder"),
        (["--out", "{full}"], "exists and is not empty"),
        (["--out", "{empty}", "--resume"], "has no .distill-checkpoint/ to continue from"),
        (["--out", "{empty}", "--teacher", "{empty}"], "has no text_encoder/"),
        (["--out", "{empty}", "--steps", "0"], "steps must be >= 1, got 0"),
        (["--out", "{empty}", "--preset", "gpu"], "--quick contradicts --preset gpu"),
    ],
)
def test_bad_command_lines_are_named(args, message, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    (tmp_path / "empty").mkdir()
    paths = {"teacher": TEACHER, "full": tmp_path / "full", "empty": tmp_path / "empty"}
    argv = ["--teacher", str(TEACHER), "--quick"] + [a.format(**paths) for a in args]
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
    assert (tmp_path / "full" / "mine.txt").read_text() == "a user's file"


STUDENT = REPO / "models" / "shapes-ldm-lcm"


def test_shipped_student_shares_the_teachers_files_and_draws_what_the_prompt_says(tmp_path):
    """The shipped student through export + runtime at its default 4 LCM steps, read back by the checker."""
    for name in SHARED:  # the teacher's, not copies that could drift
        assert (STUDENT / name).resolve() == (TEACHER / name).resolve()
    bundle = build(STUDENT, tmp_path / "bundle", precision="fp32", log=lambda _: None)
    hits = attribute_hits(runtime.Pipeline.load(bundle), guidance_scale=5.0)  # the bundle's default: 4 LCM steps
    assert min(hits.values()) >= len(WANTED) - 1, hits
