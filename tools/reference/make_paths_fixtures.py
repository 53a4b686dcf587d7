#!/usr/bin/env python3
"""Reference outputs for one "search over paths" step on the tiny SD 1.5 and Flux models.

Run by hand (never in CI) from the crate root with the reference venv:

    /tmp/refvenv/bin/python tools/reference/make_paths_fixtures.py

Only reads tests/fixtures/tiny-sd15 and tests/fixtures/tiny-flux (fp32 on the CPU). One step of
the search takes a sample x_a at level A of an N-step schedule, re-noises it forward to the
noisier level B with a given standard-normal eps, then denoises it from B to level C with a fresh
diffusers scheduler started at B (as img2img starts one). Every sample is x = alpha*x0 + sigma*eps
(SD 1.5: alpha = sqrt(ac[t]), sigma = sqrt(1 - ac[t]); Flux: alpha = 1 - s, sigma = s), and the
re-noise is x_b = r*x_a + sqrt(sigma_b^2 - r^2*sigma_a^2)*eps with r = alpha_b/alpha_a (scalars
in float64). The x0 of the last model call of the denoise is recorded as well.

Writes tests/fixtures/paths/
  reference.safetensors  per model ("sd15." / "flux."): x_a and eps (the unpacked noise shape),
                         renoised, latents (at level C) and x0 (Flux: packed (B, L, 64)), once
                         with fp32 models (float32) and once with every module in float64
                         ("_f64", float64); the level tables (sd15.timesteps, flux.sigmas,
                         flux.flux_timesteps).
  meta.json              the settings (prompt, steps, levels, seeds, guidance, sizes).

float64 notes: diffusers' FlowMatchEulerDiscreteScheduler.step rounds the sample to float32, so the
float64 run makes the same Euler step in float64 (checked against step); PNDM's coefficient
tables are cast to float64 so its step is float64 throughout.
"""

import json
import os

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, PNDMScheduler, StableDiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "paths")

PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
STEPS, A, B, C = 10, 7, 2, 5
SEED_X, SEED_EPS = 11, 12
SD_CFG, SD_SIZE = 7.5, 64
FLUX_GUIDANCE, FLUX_SIZE, FLUX_MSL = 3.5, 32, 16


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def renoise(x_a, eps, alpha_a, sigma_a, alpha_b, sigma_b):
    ratio = alpha_b / alpha_a
    var = sigma_b**2 - ratio**2 * sigma_a**2
    assert var > 0, var
    return ratio * x_a + var**0.5 * eps


def sd15_grid(config):
    s = PNDMScheduler.from_config(config)
    s.set_timesteps(STEPS)
    grid = [int(t) for t in dict.fromkeys(s.timesteps.tolist())]  # distinct, noisiest first
    assert len(grid) == STEPS, grid
    return grid


def run_sd15(pipe, x_a, eps, dtype):
    grid = sd15_grid(pipe.scheduler.config)
    ac = [float(v) for v in pipe.scheduler.alphas_cumprod]  # float32 values as float64
    level = lambda i: (ac[grid[i]] ** 0.5, (1 - ac[grid[i]]) ** 0.5)
    x = renoise(x_a.to(dtype), eps.to(dtype), *level(A), *level(B))
    renoised = x.clone()
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt="")
    context = torch.cat([uncond, cond])
    sched = PNDMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    if dtype == torch.float64:
        sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(torch.float64)
    visits = [grid[B], grid[B + 1]] + grid[B + 1 : C]  # PLMS warm-up from a fresh start
    for t in visits:
        t = torch.tensor(t)
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        u, c = pipe.unet(inp, t, encoder_hidden_states=context, return_dict=False)[0].chunk(2)
        guided = u + SD_CFG * (c - u)
        x_in, x = x, sched.step(guided, t, x).prev_sample
    a_t = ac[int(t)]
    x0 = (x_in - (1 - a_t) ** 0.5 * guided) / a_t**0.5
    return renoised, x, x0, {"timesteps": torch.tensor(grid), "visits": visits}


def flux_schedule(pipe, seq_len):
    cfg = pipe.scheduler.config
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    s.set_timesteps(STEPS, sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)  # as retrieve_timesteps
    return s, mu


def run_flux(pipe, x_a, eps, dtype):
    _, ch, h, w = x_a.shape
    pack = lambda z: pipe._pack_latents(z.to(dtype), 1, ch, h, w)
    x_a, eps = pack(x_a), pack(eps)
    sched, mu = flux_schedule(pipe, x_a.shape[1])
    sig = [float(v) for v in sched.sigmas]
    x = renoise(x_a, eps, 1 - sig[A], sig[A], 1 - sig[B], sig[B])
    renoised = x.clone()
    embeds, pooled, txt_ids = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=FLUX_MSL)
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", dtype)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], FLUX_GUIDANCE, dtype=torch.float32).expand(1)
    sched.set_begin_index(B)
    for t in sched.timesteps[B:C]:
        v = pipe.transformer(hidden_states=x, timestep=t.expand(1).to(dtype) / 1000, guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                             img_ids=img_ids, return_dict=False)[0]
        i = sched.step_index if sched.step_index is not None else B
        x_in, x = x, sched.step(v, t, x, return_dict=False)[0]
        if dtype == torch.float64:  # step rounds the sample to float32: redo it in float64
            exact = x_in + (sig[i + 1] - sig[i]) * v
            assert (exact - x).abs().max() < 1e-5
            x = exact
    x0 = x_in - sig[C - 1] * v
    return renoised, x, x0, {"sigmas": sched.sigmas.clone(), "flux_timesteps": sched.timesteps.clone(), "mu": mu}


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    tensors, meta = {}, {"prompt": PROMPT, "steps": STEPS, "level_a": A, "level_b": B, "level_c": C,
                         "seed_x_a": SEED_X, "seed_eps": SEED_EPS}
    cases = [
        ("sd15", StableDiffusionPipeline, "tiny-sd15", dict(safety_checker=None), run_sd15, (1, 4, SD_SIZE // 8, SD_SIZE // 8)),
        ("flux", FluxPipeline, "tiny-flux", {}, run_flux, None),
    ]
    for name, cls, folder, kw, run, shape in cases:
        pipe = cls.from_pretrained(os.path.join(FIX, folder), torch_dtype=torch.float32, local_files_only=True, **kw)
        if shape is None:  # Flux: the pipeline's own unpacked noise shape
            f = 2 * (FLUX_SIZE // (pipe.vae_scale_factor * 2))
            shape = (1, pipe.transformer.config.in_channels // 4, f, f)
        x_a, eps = randn(shape, SEED_X), randn(shape, SEED_EPS)
        tensors[f"{name}.x_a"], tensors[f"{name}.eps"] = x_a, eps
        r32 = run(pipe, x_a, eps, torch.float32)
        pipe.to(torch.float64)
        r64 = run(pipe, x_a, eps, torch.float64)
        for key, a, b in zip(["renoised", "latents", "x0"], r32, r64):
            tensors[f"{name}.{key}"] = a.float()
            tensors[f"{name}.{key}_f64"] = b.double()
            print(f"{name}.{key:8s} shape {tuple(a.shape)}  max|fp32-fp64| {(a.double() - b).abs().max().item():.3e}"
                  f"  max|fp64| {b.abs().max().item():.4f}")
        extra = r32[3]
        for k, v in extra.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}.{k}"] = v
        meta[name] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        meta[name]["noise_shape"] = list(shape)
        del pipe
    meta["sd15"].update(height=SD_SIZE, width=SD_SIZE, guidance_scale=SD_CFG, negative_prompt="")
    meta["flux"].update(height=FLUX_SIZE, width=FLUX_SIZE, guidance_scale=FLUX_GUIDANCE, max_sequence_length=FLUX_MSL)
    path = os.path.join(OUT, "reference.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for k, v in tensors.items():
        print(f"  {k:22s} {str(v.dtype):14s} {tuple(v.shape)}")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
