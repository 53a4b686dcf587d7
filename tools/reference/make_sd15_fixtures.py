#!/usr/bin/env python3
"""Builds the tiny random-weight Stable Diffusion 1.5 model and its reference outputs.

Run by hand (never in CI) from the crate root with the reference venv:

    /work/venv/bin/python tools/reference/make_sd15_fixtures.py

Writes
  tests/fixtures/tiny-sd15/   a tiny SD 1.5 in diffusers layout (model_index.json, unet/, vae/,
                              text_encoder/, tokenizer/ with vocab.json + merges.txt only,
                              scheduler/ with SD 1.5's real PNDM config), saved with
                              save_pretrained(safe_serialization=True), plus fp16 variants of
                              the text encoder and VAE.
  tests/fixtures/sd15/        reference outputs from transformers/diffusers (fp32, CPU):
    tokens.json               prompt -> CLIPTokenizer ids (padding="max_length", truncation)
    reference.safetensors     text encoder states, one UNet forward, one VAE decode,
                              the initial latents each pipeline run drew
    scheduler_ddim.json, scheduler_euler.json
                              DDIM / EulerDiscrete configs made with from_config(pndm.config)
    pipeline.json             the settings of each full pipeline run
    image_<name>_<i>.png      the full pipeline images (output_type="pil")
"""

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-sd15")
REF = os.path.join(ROOT, "tests", "fixtures", "sd15")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# SD 1.5's scheduler/scheduler_config.json, verbatim.
SD15_SCHEDULER = {
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

# Text the tiny BPE is trained on (words only shape the merges).
BPE_CORPUS = """
a photo of a cat sitting on a red chair in the sun, highly detailed, 4k
an astronaut riding a horse on the moon, digital art, trending on artstation
a beautiful landscape with mountains and a lake at sunset, oil painting
portrait of a woman with long hair, studio lighting, sharp focus
the city at night, neon lights, rain, cinematic, photorealistic
a cute dog playing in the garden with flowers and trees
blurry, low quality, bad anatomy, worst quality, watermark, text
"""

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a HORSE on the moon!!",
    "it's the dog's toy, isn't it? they'll say we've done it; I'd've",
    "4k, 1080p, 3.14159 and 2025-11-27 at 12:30",
    "café naïve résumé — «quotes» and emoji 🐱🚀 ok",
    "日本語のテキスト 和 中文 mixed",
    "  lots   of\twhitespace\n\nand newlines  ",
    "punctuation!!! ... ??? (brackets) [square] {curly} <angle> @#$%^&*_+=~`|\\/",
    "<|startoftext|> literal special tokens <|endoftext|> inside",
    " ".join(["word{} highly detailed, masterpiece".format(i) for i in range(40)]),
]

PROMPT = "a photo of a cat sitting on a red chair, highly detailed"
NEGATIVE = "blurry, low quality"


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs], dict(zip(bs, (chr(c) for c in cs)))


def train_tiny_bpe(num_merges):
    """A CLIP-format vocab (bytes, bytes+</w>, merges, specials) and merge list."""
    alphabet, byte_encoder = bytes_to_unicode()
    pat = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.IGNORECASE)
    words = Counter()
    for w in pat.findall(BPE_CORPUS.lower()):
        chars = [byte_encoder[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        words[tuple(chars)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new_words = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    vocab = {}
    for tok in alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    return vocab, merges


def write_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    vocab, merges = train_tiny_bpe(300)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": EOS,
        "unk_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    config = {
        "add_prefix_space": False,
        "bos_token": special["bos_token"],
        "do_lower_case": True,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": EOS,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special["unk_token"],
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


def build_model():
    if os.path.isdir(MODEL):
        shutil.rmtree(MODEL)
    os.makedirs(MODEL)
    vocab_size = write_tokenizer(os.path.join(MODEL, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    # from_pretrained may add a tokenizer.json; the SD 1.5 layout has none.
    for extra in ("tokenizer.json",):
        p = os.path.join(MODEL, "tokenizer", extra)
        if os.path.exists(p):
            os.remove(p)

    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config).eval()

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        # Our UNet honours norm_num_groups (candle-transformers' forced 32 and 32-wide blocks).
        block_out_channels=(16, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),  # per block: 2 heads in the first, 4 in the mid block
        norm_num_groups=4,
    ).eval()

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
    ).eval()

    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(MODEL, safe_serialization=True)
    for extra in ("tokenizer.json",):
        p = os.path.join(MODEL, "tokenizer", extra)
        if os.path.exists(p):
            os.remove(p)
    # The real repo's scheduler config, byte for byte in content.
    with open(os.path.join(MODEL, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    # fp16 variants for the text encoder and the VAE (the small components, to keep the fixture
    # small); the UNet has none, so an fp16 load falls back to its plain fp32 file and converts.
    text_encoder.to(torch.float16).save_pretrained(
        os.path.join(MODEL, "text_encoder"), safe_serialization=True, variant="fp16"
    )
    text_encoder.to(torch.float32)
    vae.to(torch.float16).save_pretrained(os.path.join(MODEL, "vae"), safe_serialization=True, variant="fp16")
    vae.to(torch.float32)


def main():
    torch.set_grad_enabled(False)
    build_model()
    os.makedirs(REF, exist_ok=True)
    for f in os.listdir(REF):
        os.remove(os.path.join(REF, f))

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    tensors = {}

    # 1. Tokenizer ids, exactly as the pipeline asks for them.
    tokens = []
    for p in PROMPTS:
        ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        tokens.append({"prompt": p, "ids": ids})
    with open(os.path.join(REF, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)

    # 2. Text encoder hidden states for two prompts.
    for i, p in enumerate([PROMPT, ""]):
        ids = tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        tensors[f"text_ids_{i}"] = ids.to(torch.int64)
        tensors[f"text_hidden_{i}"] = pipe.text_encoder(ids)[0].contiguous()

    # 3. One UNet forward on a fixed input (batch 2, as under guidance).
    g = torch.Generator("cpu").manual_seed(10)
    sample = torch.randn((2, 4, 8, 8), generator=g)
    context = torch.randn((2, 77, 32), generator=g)
    tensors["unet_sample"] = sample
    tensors["unet_context"] = context
    tensors["unet_timestep"] = torch.tensor([981.0])
    tensors["unet_out"] = pipe.unet(sample, 981, encoder_hidden_states=context).sample.contiguous()

    # 4. One VAE decode of latents (already divided by scaling_factor, as the pipeline passes them).
    z = torch.randn((1, 4, 8, 8), generator=g)
    tensors["vae_latents"] = z
    tensors["vae_out"] = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.contiguous()

    # 5. Full pipeline runs.
    runs = []
    sched_configs = {
        "pndm": None,
        "ddim": DDIMScheduler.from_config(pipe.scheduler.config),
        "euler": EulerDiscreteScheduler.from_config(pipe.scheduler.config),
    }
    pndm = pipe.scheduler
    for name, sched in sched_configs.items():
        if sched is not None:
            with open(os.path.join(REF, f"scheduler_{name}.json"), "w") as f:
                json.dump(dict(sched.config), f, indent=2)
        pipe.scheduler = sched if sched is not None else pndm
        seed = 42
        common = dict(height=64, width=64, num_inference_steps=4, guidance_scale=7.5)
        gen = torch.Generator("cpu").manual_seed(seed)
        out = pipe(PROMPT, negative_prompt=NEGATIVE, generator=gen, output_type="pil", **common).images
        latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
        # The pipeline drew exactly these latents: feeding them back gives the same image.
        again = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), output_type="pil", **common).images
        assert np.array_equal(np.asarray(out[0]), np.asarray(again[0]))
        tensors[f"latents_{name}_0"] = latents
        out[0].save(os.path.join(REF, f"image_{name}_0.png"))
        runs.append({"scheduler": name, "seed": seed, "prompt": PROMPT, "negative_prompt": NEGATIVE, "batch": 1, **common})
        arr = np.asarray(out[0])
        print(name, "image mean", arr.mean(), "min", arr.min(), "max", arr.max(),
              "saturated", float(((arr == 0) | (arr == 255)).mean()))

    # Batched as the original tool does: prompt=[p]*B with stacked latents, no negative prompt.
    pipe.scheduler = pndm
    lat = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(s)) for s in (7, 8)])
    out = pipe([PROMPT] * 2, latents=lat.clone(), height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
               output_type="pil").images
    for i, im in enumerate(out):
        tensors[f"latents_batch_{i}"] = lat[i : i + 1].contiguous()
        im.save(os.path.join(REF, f"image_batch_{i}.png"))
    runs.append({"scheduler": "pndm", "seeds": [7, 8], "prompt": PROMPT, "negative_prompt": None, "batch": 2,
                 "height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 7.5})
    with open(os.path.join(REF, "pipeline.json"), "w") as f:
        json.dump(runs, f, indent=2)

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(REF, "reference.safetensors"))
    total = 0
    for d in (MODEL, REF):
        for dp, _, fs in os.walk(d):
            total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
    print("fixtures total bytes:", total)


if __name__ == "__main__":
    main()
