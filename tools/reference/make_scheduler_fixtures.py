#!/usr/bin/env python3
"""Golden values for tt-scale's schedulers, from the real diffusers schedulers.

Run by hand (never in CI) from the crate root, with torch, diffusers and safetensors installed:

    python tools/reference/make_scheduler_fixtures.py

Writes tests/fixtures/schedulers/cases.json (one entry per scheduler config: the config JSON
exactly as the Rust side reads it, the step counts, the fixture file) and one
<case>.safetensors per case holding:

- ``alphas_cumprod`` (float32): the training schedule diffusers builds;
- ``timesteps_<n>`` (float64), ``init_noise_sigma_<n>`` (float64, shape [1]) and, for Euler,
  ``sigmas_<n>`` (float32) after ``set_timesteps(n)`` for each step count n;
- a short denoising run after ``set_timesteps(run_steps)`` on a (1, 4, 8, 8) float32 sample
  with seeded model outputs: ``run_noise`` (the sample before ``init_noise_sigma``), and per
  call i ``run_model_output_<i>``, ``run_scaled_<i>`` (``scale_model_input``) and
  ``run_prev_<i>`` (``step(...).prev_sample``).
"""

import copy
import json
import os
import sys

import diffusers
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from safetensors.torch import save_file

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "schedulers")
STEP_COUNTS = [1, 4, 10, 25, 50]
RUN_STEPS = 5
SHAPE = (1, 4, 8, 8)

CLASSES = {
    "PNDMScheduler": PNDMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def variant(base, **changes):
    config = copy.deepcopy(base)
    config.update(changes)
    return config


CASES = [
    ("pndm_sd15", SD15),
    ("pndm_sd15_prk", variant(SD15, skip_prk_steps=False)),
    ("pndm_linear_linspace_v_prediction",
     variant(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
             timestep_spacing="linspace", prediction_type="v_prediction", set_alpha_to_one=True)),
    ("pndm_trailing", variant(SD15, timestep_spacing="trailing")),
    ("ddim_sd15", variant(SD15, _class_name="DDIMScheduler")),
    ("ddim_defaults_clip", {"_class_name": "DDIMScheduler", "clip_sample_range": 1.5}),
    ("ddim_trailing_v_prediction_zero_snr",
     variant(SD15, _class_name="DDIMScheduler", timestep_spacing="trailing",
             prediction_type="v_prediction", rescale_betas_zero_snr=True)),
    ("ddim_cosine_linspace_sample",
     variant(SD15, _class_name="DDIMScheduler", beta_schedule="squaredcos_cap_v2",
             timestep_spacing="linspace", prediction_type="sample", clip_sample=True)),
    ("euler_sd15", variant(SD15, _class_name="EulerDiscreteScheduler")),
    ("euler_sdxl", SDXL),
    ("euler_sdxl_linspace", variant(SDXL, timestep_spacing="linspace")),
    ("euler_sdxl_trailing", variant(SDXL, timestep_spacing="trailing")),
    ("euler_sdxl_v_prediction", variant(SDXL, prediction_type="v_prediction")),
    ("euler_sdxl_karras", variant(SDXL, use_karras_sigmas=True)),
    ("euler_exponential_sigma_min",
     variant(SDXL, use_exponential_sigmas=True, final_sigmas_type="sigma_min",
             timestep_spacing="trailing")),
    ("euler_log_linear", variant(SDXL, interpolation_type="log_linear")),
    ("euler_zero_snr_v_continuous",
     variant(SDXL, rescale_betas_zero_snr=True, prediction_type="v_prediction",
             timestep_type="continuous", timestep_spacing="trailing")),
    ("euler_sample_prediction", variant(SDXL, prediction_type="sample")),
]


def build(config):
    return CLASSES[config["_class_name"]].from_config(config)


def to_f64(x):
    return torch.as_tensor(x).to(torch.float64).reshape(-1).contiguous()


def make_case(name, config, seed):
    tensors = {"alphas_cumprod": build(config).alphas_cumprod.to(torch.float32).contiguous()}
    steps = list(STEP_COUNTS)
    if config["_class_name"] == "PNDMScheduler" and not config.get("skip_prk_steps", False):
        steps = [n for n in steps if n >= 4]  # diffusers' Runge-Kutta warm-up needs 4 timesteps
    if config.get("timestep_spacing") == "trailing":
        steps.append(61)  # numpy's arange yields 62 trailing timesteps here
    for n in steps:
        scheduler = build(config)
        scheduler.set_timesteps(n)
        tensors[f"timesteps_{n}"] = to_f64(scheduler.timesteps)
        tensors[f"init_noise_sigma_{n}"] = to_f64(float(scheduler.init_noise_sigma))
        if isinstance(scheduler, EulerDiscreteScheduler):
            tensors[f"sigmas_{n}"] = scheduler.sigmas.to(torch.float32).contiguous()

    generator = torch.Generator().manual_seed(seed)
    scheduler = build(config)
    scheduler.set_timesteps(RUN_STEPS)
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
    tensors["run_noise"] = noise
    sample = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(sample, t)
        model_output = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
        sample = scheduler.step(model_output, t, sample).prev_sample
        tensors[f"run_model_output_{i}"] = model_output
        tensors[f"run_scaled_{i}"] = scaled.clone()
        tensors[f"run_prev_{i}"] = sample.clone()
    save_file(tensors, os.path.join(OUT_DIR, f"{name}.safetensors"))
    return {
        "name": name,
        "config": config,
        "steps": steps,
        "run_steps": RUN_STEPS,
        "run_calls": len(scheduler.timesteps),
        "file": f"{name}.safetensors",
    }


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    entries = [make_case(name, config, seed) for seed, (name, config) in enumerate(CASES)]
    index = {
        "generator": "tools/reference/make_scheduler_fixtures.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "cases": entries,
    }
    with open(os.path.join(OUT_DIR, "cases.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {len(entries)} cases to {OUT_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
