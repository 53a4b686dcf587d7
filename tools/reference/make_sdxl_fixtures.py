#!/usr/bin/env python3
"""Builds the tiny random-weight SDXL model and its reference outputs.

Run by hand (never in CI) from the crate root with the reference venv:

    /work/venv/bin/python tools/reference/make_sdxl_fixtures.py

Writes
  tests/fixtures/tiny-sdxl/   a tiny SDXL in diffusers layout (model_index.json with
                              force_zeros_for_empty_prompt, unet/ with text-time conditioning,
                              vae/ with force_upcast and scaling_factor 0.13025, text_encoder/
                              (CLIPTextModel, quick_gelu), text_encoder_2/ (CLIPTextModelWithProjection,
                              gelu), tokenizer/ (pad = EOS) and tokenizer_2/ (pad = "!", as the real
                              repo), scheduler/ with SDXL base's real EulerDiscrete config), plus fp16
                              variants of text_encoder_2 and the VAE.
  tests/fixtures/sdxl/        reference outputs from transformers/diffusers (fp32, CPU):
    tokens.json               prompt -> ids of both tokenizers (padding="max_length", truncation)
    reference.safetensors     penultimate hidden states of both encoders, the pooled projection,
                              one UNet forward with text-time conditioning, one VAE decode, the
                              prompt embeddings the pipeline built, the latents of each run
    scheduler_dpm.json        DPMSolverMultistep config made with from_config(euler.config)
    pipeline.json             the settings of each full pipeline run
    image_<name>.png          the full pipeline images (output_type="pil", no watermark)
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl")
REF = os.path.join(ROOT, "tests", "fixtures", "sdxl")

# The tiny CLIP BPE of the SD 1.5 fixtures (same corpus, same merges).
_spec = importlib.util.spec_from_file_location(
    "make_sd15_fixtures", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sd15_fixtures.py")
)
sd15 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sd15)

BOS, EOS = sd15.BOS, sd15.EOS

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, verbatim.
SDXL_SCHEDULER = {
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

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a HORSE on the moon!!",
    "punctuation!!! ... ??? (brackets) [square] {curly}",
    " ".join(["word{} highly detailed, masterpiece".format(i) for i in range(40)]),
]

PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
NEGATIVE = "blurry, low quality"

TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL)
TE1_HIDDEN, TE2_HIDDEN, PROJECTION = 32, 48, 24


def write_tokenizer(folder, pad):
    """CLIP tokenizer files; SDXL's tokenizer_2 pads with "!" where tokenizer pads with EOS."""
    vocab_size = sd15.write_tokenizer(folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        with open(path) as f:
            data = json.load(f)
        data["pad_token"] = pad
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    return vocab_size


def build_model():
    if os.path.isdir(MODEL):
        shutil.rmtree(MODEL)
    os.makedirs(MODEL)
    vocab_size = write_tokenizer(os.path.join(MODEL, "tokenizer"), EOS)
    write_tokenizer(os.path.join(MODEL, "tokenizer_2"), "!")
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer_2"))
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0

    # eos_token_id = 2 as in the real repo's configs: transformers then pools at argmax(input_ids).
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, num_hidden_layers=3, layer_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TE1_HIDDEN, intermediate_size=37, num_attention_heads=4, hidden_act="quick_gelu",
        projection_dim=TE1_HIDDEN, **common)).eval()
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=TE2_HIDDEN, intermediate_size=64, num_attention_heads=4, hidden_act="gelu",
        projection_dim=PROJECTION, **common)).eval()

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),  # read as head counts, as in SDXL's config
        use_linear_projection=True,
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION,
        norm_num_groups=4,  # our UNet honours it (candle's plain blocks force 32)
    ).eval()
    # Random init leaves the time/add embeddings weak; scale them up so they matter in the output.
    with torch.no_grad():
        for lin in (unet.add_embedding.linear_1, unet.add_embedding.linear_2):
            lin.weight.mul_(3.0)

    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(MODEL, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        p = os.path.join(MODEL, folder, "tokenizer.json")
        if os.path.exists(p):
            os.remove(p)
    with open(os.path.join(MODEL, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SDXL_SCHEDULER, f, indent=2)
    # fp16 variants of text_encoder_2 and the VAE; text_encoder and the UNet have none, so an fp16
    # load falls back to their fp32 files and converts.
    for name, model in (("text_encoder_2", text_encoder_2), ("vae", vae)):
        model.to(torch.float16).save_pretrained(os.path.join(MODEL, name), safe_serialization=True, variant="fp16")
        model.to(torch.float32)


def load_pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.watermark is None
    return pipe


def main():
    torch.set_grad_enabled(False)
    build_model()
    os.makedirs(REF, exist_ok=True)
    for f in os.listdir(REF):
        os.remove(os.path.join(REF, f))
    pipe = load_pipe()
    tensors = {}

    # 1. Both tokenizers, as encode_prompt calls them.
    tokens = []
    for p in PROMPTS:
        ids = [t(p, padding="max_length", max_length=t.model_max_length, truncation=True).input_ids
               for t in (pipe.tokenizer, pipe.tokenizer_2)]
        tokens.append({"prompt": p, "ids": ids[0], "ids_2": ids[1]})
    with open(os.path.join(REF, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)

    # 2. Text encoders: penultimate hidden states; pooled projection of text_encoder_2.
    for i, p in enumerate([PROMPT, NEGATIVE]):
        ids = pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = pipe.tokenizer_2(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o1 = pipe.text_encoder(ids, output_hidden_states=True)
        o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        assert len(o1.hidden_states) == pipe.text_encoder.config.num_hidden_layers + 1
        tensors[f"text_ids_{i}"] = ids.to(torch.int64)
        tensors[f"text_ids2_{i}"] = ids2.to(torch.int64)
        tensors[f"text_penultimate_{i}"] = o1.hidden_states[-2].contiguous()
        tensors[f"text2_penultimate_{i}"] = o2.hidden_states[-2].contiguous()
        tensors[f"text2_pooled_{i}"] = o2.text_embeds.contiguous()
        pe, npe, ppe, nppe = pipe.encode_prompt(p, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
        tensors[f"prompt_embeds_{i}"] = pe.contiguous()
        tensors[f"pooled_prompt_embeds_{i}"] = ppe.contiguous()
        if i == 0:
            tensors["negative_prompt_embeds"] = npe.contiguous()
            tensors["negative_pooled_prompt_embeds"] = nppe.contiguous()

    # 3. One UNet forward with text-time conditioning (batch 2, different time ids per row).
    g = torch.Generator("cpu").manual_seed(10)
    sample = torch.randn((2, 4, 8, 8), generator=g)
    context = torch.randn((2, 77, TE1_HIDDEN + TE2_HIDDEN), generator=g)
    text_embeds = torch.randn((2, PROJECTION), generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [1024.0, 768.0, 16.0, 32.0, 512.0, 640.0]])
    tensors.update(unet_sample=sample, unet_context=context, unet_text_embeds=text_embeds, unet_time_ids=time_ids,
                   unet_timestep=torch.tensor([981.0]))
    cond = {"text_embeds": text_embeds, "time_ids": time_ids}
    tensors["unet_out"] = pipe.unet(sample, 981, encoder_hidden_states=context,
                                    added_cond_kwargs=cond).sample.contiguous()
    # The same with other time ids: the conditioning must change the output.
    cond2 = {"text_embeds": text_embeds, "time_ids": time_ids.flip(0).contiguous()}
    other = pipe.unet(sample, 981, encoder_hidden_states=context, added_cond_kwargs=cond2).sample
    print("unet: output change from time ids", float((other - tensors["unet_out"]).abs().max()))
    # A non-integer timestep (Euler with other spacings) and an odd latent size (12 x 10).
    sample_odd = torch.randn((1, 4, 12, 10), generator=g)
    tensors["unet_sample_odd"] = sample_odd
    tensors["unet_out_odd"] = pipe.unet(sample_odd, torch.tensor([517.25]), encoder_hidden_states=context[:1],
                                        added_cond_kwargs={"text_embeds": text_embeds[:1],
                                                           "time_ids": time_ids[:1]}).sample.contiguous()

    # 4. One VAE decode (latents already divided by scaling_factor, as the pipeline passes them).
    z = torch.randn((1, 4, 8, 8), generator=g)
    tensors["vae_latents"] = z
    tensors["vae_out"] = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.contiguous()

    # 5. Full pipeline runs.
    runs = []
    euler = pipe.scheduler
    dpm = DPMSolverMultistepScheduler.from_config(euler.config)
    with open(os.path.join(REF, "scheduler_dpm.json"), "w") as f:
        # lambda_min_clipped defaults to -inf, which json writes as the non-JSON -Infinity.
        json.dump({k: v for k, v in dpm.config.items() if not (isinstance(v, float) and not np.isfinite(v))},
                  f, indent=2)
    cases = [
        # name, scheduler, negative prompt, height, width, guidance, seed
        ("euler", euler, NEGATIVE, 64, 64, 5.0, 42),
        ("euler_zero_negative", euler, None, 64, 64, 5.0, 43),
        ("euler_no_guidance", euler, None, 64, 64, 1.0, 44),
        ("euler_wide", euler, NEGATIVE, 64, 96, 5.0, 45),
        ("dpm", dpm, NEGATIVE, 64, 64, 5.0, 46),
    ]
    for name, sched, negative, h, w, cfg, seed in cases:
        pipe.scheduler = sched
        common = dict(height=h, width=w, num_inference_steps=4, guidance_scale=cfg)
        gen = torch.Generator("cpu").manual_seed(seed)
        out = pipe(PROMPT, negative_prompt=negative, generator=gen, output_type="pil", **common).images
        latents = torch.randn((1, 4, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
        again = pipe(PROMPT, negative_prompt=negative, latents=latents.clone(), output_type="pil", **common).images
        assert np.array_equal(np.asarray(out[0]), np.asarray(again[0]))
        tensors[f"latents_{name}"] = latents
        out[0].save(os.path.join(REF, f"image_{name}.png"))
        runs.append({"name": name, "scheduler": "dpm" if sched is dpm else "euler", "seed": seed, "prompt": PROMPT,
                     "negative_prompt": negative, **common})
        arr = np.asarray(out[0]).astype(np.float64)
        print(name, "image mean", arr.mean(), "std", arr.std(), "saturated",
              float(((arr == 0) | (arr == 255)).mean()))
    with open(os.path.join(REF, "pipeline.json"), "w") as f:
        json.dump(runs, f, indent=2)

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(REF, "reference.safetensors"))
    for d in (MODEL, REF):
        total = 0
        for dp, _, fs in os.walk(d):
            total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
        print(d, "bytes:", total)


if __name__ == "__main__":
    main()
