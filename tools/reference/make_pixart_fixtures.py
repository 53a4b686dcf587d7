#!/usr/bin/env python3
"""Builds the tiny random-weight PixArt-Sigma model and its reference outputs.

Run by hand (never in CI) from the crate root with the reference venv (beautifulsoup4 and ftfy
installed, as diffusers' clean_caption needs them):

    /work/venv/bin/python tools/reference/make_pixart_fixtures.py

Writes
  tests/fixtures/tiny-pixart/  a tiny PixArt-Sigma in diffusers layout: model_index.json,
                               transformer/ (sample_size 32, so the 256 aspect-ratio bins apply),
                               text_encoder/ (T5 v1.1 style, gated-gelu), tokenizer/ (a tiny
                               sentencepiece unigram spiece.model + tokenizer_config.json, as the
                               real repo has), vae/ (SDXL-style config, scaling 0.13025) and
                               scheduler/ (the real repo's DPMSolverMultistep config).
  tests/fixtures/pixart/       reference outputs (fp32, CPU):
    tokens.json                prompt -> T5Tokenizer ids and attention mask (max_length 300)
    reference.safetensors      T5 states with mask, one transformer forward, scheduler steps
    schedulers.json            DPMSolverMultistep configs with their timesteps and sigmas
    pipeline.json, image_*.png full pipeline runs
    captions.json              diffusers' _clean_caption / _text_preprocessing on messy prompts
"""

import io
import json
import os
import shutil

import numpy as np
import sentencepiece as spm
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-pixart")
REF = os.path.join(ROOT, "tests", "fixtures", "pixart")

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS scheduler/scheduler_config.json.
REPO_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}

SPM_CORPUS = """
a photo of a cat sitting on a red chair in the sun, highly detailed, 4k
an astronaut riding a horse on the moon, digital art, trending on artstation
a beautiful landscape with mountains and a lake at sunset, oil painting
portrait of a woman with long hair, studio lighting, sharp focus
the city at night, neon lights, rain, cinematic, photorealistic
a cute dog playing in the garden with flowers and trees
blurry, low quality, bad anatomy, worst quality, watermark, text
a small robot reading a book under a tree, watercolor, soft colors
""".strip().splitlines()

TOKEN_PROMPTS = [
    "a photo of a cat",
    "",
    "An Astronaut riding a HORSE on the moon!!",
    "  lots   of\twhitespace\n\nand newlines  ",
    "café naïve résumé — ｆｕｌｌｗｉｄｔｈ and ﬁ ligature ½",
    "unknown words: zyxwvut qqq 12345",
    "sentinel <extra_id_0> and </s> inside",
    " ".join(f"word{i} highly detailed" for i in range(120)),
]

CAPTIONS = [
    "A photo of a CAT",
    "  Leading and trailing spaces  ",
    "Visit https://example.com/page?id=3 for more",
    "see www.example.org/foo and example.net/bar/",
    "mail me at someone@example.com please",
    "<b>Bold</b> and <i>italic</i> text &amp; more",
    "<p>paragraph</p><br/>line &lt;tag&gt; &quot;quoted&quot;",
    "hello @username how are you",
    "Chinese 中文字符 and Japanese かな mixed",
    "dashes — and – and ‑ here",
    "«guillemets» and “curly” quotes ‘single’",
    "&quot;quoted&quot; &amp stuff",
    "server at 192.168.0.1 is down",
    "article 1:23   ",
    "line one\\nline two",
    "tag #123 and #123456 and 1234567 id",
    "file image.png and photo.JPG and doc.pdf",
    '"""AUSVERKAUFT""" and ... dots',
    "***SALE*** #hashtag (parens) [brackets] {braces} | / \\ ~ ©®™",
    "word . word",
    "this-is-my-cute-cat-photo",
    "this_is_my_cute_cat",
    "model jc6640 and jc6640vc and 6640vc231",
    "worldwide free shipping on all orders",
    "free download free now",
    "click here for details, click on link",
    "png images and jpg image here",
    "see page 12 for details",
    "code j2d1a2a here",
    "size 1920x1080 and 3.5×2 prints",
    "time : noon",
    "a,b.c/d done",
    "'quoted caption'",
    "-leading dash",
    "trailing plus+",
    ".hidden",
    "a%20url%20encoded+string",
    "Caf\u00e9 with fullwidth ＡＢＣ",
    "multiple     spaces\tand\ttabs",
    "<person> walks a dog",
    "An Astronaut riding a HORSE on the moon!!",
    "",
]


def train_spm(folder):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 4),
        model_writer=buf,
        vocab_size=100,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    config = {
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)],
        "eos_token": "</s>",
        "extra_ids": 100,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
        "legacy": True,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def build_model():
    if os.path.isdir(MODEL):
        shutil.rmtree(MODEL)
    os.makedirs(MODEL)
    train_spm(os.path.join(MODEL, "tokenizer"))
    tokenizer = T5Tokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    for extra in ("tokenizer.json", "special_tokens_map.json"):
        p = os.path.join(MODEL, "tokenizer", extra)
        if os.path.exists(p):
            os.remove(p)
    vocab_size = len(tokenizer)

    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():
        for p in t5.parameters():
            p.normal_(0.0, 0.5)
        for block in t5.encoder.block:
            for layer in block.layer:
                layer.layer_norm.weight.normal_(1.0, 0.2)
    t5.save_pretrained(os.path.join(MODEL, "text_encoder"), safe_serialization=True)

    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=32,
        patch_size=2,
        caption_channels=32,
        interpolation_scale=None,
        use_additional_conditions=False,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
    ).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    transformer.save_pretrained(os.path.join(MODEL, "transformer"), safe_serialization=True)

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    vae.save_pretrained(os.path.join(MODEL, "vae"), safe_serialization=True)

    scheduler = DPMSolverMultistepScheduler.from_config(REPO_SCHEDULER)
    scheduler.save_pretrained(os.path.join(MODEL, "scheduler"))
    # Keep the repo's config verbatim (from_config rewrites it with every default).
    with open(os.path.join(MODEL, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({k: v for k, v in REPO_SCHEDULER.items() if k != "lambda_min_clipped"}, f, indent=2)

    index = {
        "_class_name": "PixArtSigmaPipeline",
        "_diffusers_version": "0.28.0.dev0",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(MODEL, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def reference():
    os.makedirs(REF, exist_ok=True)
    pipe = PixArtSigmaPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    tok = pipe.tokenizer
    tensors = {}

    # Tokenizer.
    tokens = []
    for p in TOKEN_PROMPTS:
        enc = tok(p, padding="max_length", max_length=300, truncation=True, add_special_tokens=True)
        tokens.append({"prompt": p, "ids": enc.input_ids, "mask": enc.attention_mask})
    with open(os.path.join(REF, "tokens.json"), "w") as f:
        json.dump(tokens, f, ensure_ascii=False)

    # T5 with mask (two prompts of different lengths, max 300 tokens).
    enc = tok(["a photo of a cat", "an astronaut riding a horse on the moon, digital art"],
              padding="max_length", max_length=300, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = pipe.text_encoder(enc.input_ids, attention_mask=enc.attention_mask)[0]
    tensors["t5.input_ids"] = enc.input_ids.to(torch.int64)
    tensors["t5.mask"] = enc.attention_mask.to(torch.int64)
    tensors["t5.states"] = states.contiguous()

    # One transformer forward on a non-square latent, with a caption mask.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 12, generator=g)
    ctx = torch.randn(2, 10, 32, generator=g)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4], dtype=torch.int64)
    t = torch.tensor([999, 321], dtype=torch.int64)
    with torch.no_grad():
        out = pipe.transformer(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    tensors.update({"tr.x": x, "tr.ctx": ctx, "tr.mask": mask, "tr.t": t, "tr.out": out.contiguous()})

    # DPMSolverMultistep: every step for a few configs, with pseudo-random model outputs.
    variants = {
        "repo_20": (dict(REPO_SCHEDULER), 20),
        "repo_7": (dict(REPO_SCHEDULER), 7),
        "order3_heun": ({**REPO_SCHEDULER, "solver_order": 3, "solver_type": "heun"}, 12),
        "dpmsolver_sigma_min_leading": ({**REPO_SCHEDULER, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                         "timestep_spacing": "leading", "steps_offset": 1}, 10),
        "vpred_trailing_scaled": ({**REPO_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                   "lower_order_final": False, "euler_at_final": True}, 16),
        "sample_clipped": ({**REPO_SCHEDULER, "prediction_type": "sample", "lambda_min_clipped": -5.1,
                            "solver_order": 3}, 25),
    }
    sched_json = {}
    for name, (cfg, steps) in variants.items():
        cfg = {k: v for k, v in cfg.items() if k != "_diffusers_version"}
        s = DPMSolverMultistepScheduler.from_config(cfg)
        s.set_timesteps(steps)
        g = torch.Generator().manual_seed(7)
        sample = torch.randn(1, 4, 4, 4, generator=g)
        tensors[f"sched.{name}.init"] = sample.clone()
        outs, prevs = [], []
        for t in s.timesteps:
            mo = torch.randn(1, 4, 4, 4, generator=g)
            sample = s.step(mo, t, sample, return_dict=False)[0]
            outs.append(mo)
            prevs.append(sample.clone())
        tensors[f"sched.{name}.model_outputs"] = torch.stack(outs)
        tensors[f"sched.{name}.samples"] = torch.stack(prevs)
        cfg_json = {k: (None if isinstance(v, float) and v == -float("inf") else v) for k, v in cfg.items()}
        if cfg_json.get("lambda_min_clipped", 0) is None:
            del cfg_json["lambda_min_clipped"]
        sched_json[name] = {
            "config": cfg_json,
            "steps": steps,
            "timesteps": [int(v) for v in s.timesteps],
            "sigmas": [float(v) for v in s.sigmas],
        }
    with open(os.path.join(REF, "schedulers.json"), "w") as f:
        json.dump(sched_json, f, indent=1)

    # Full pipeline runs (latents drawn by torch.randn with a CPU generator, as diffusers does).
    runs = [
        {"name": "square", "prompt": "a photo of a cat", "negative_prompt": "", "seed": 0, "height": 256,
         "width": 256, "steps": 4, "guidance_scale": 4.5},
        {"name": "binned", "prompt": "An astronaut riding a HORSE, https://x.com", "negative_prompt": "blurry",
         "seed": 42, "height": 200, "width": 256, "steps": 3, "guidance_scale": 4.5},
    ]
    for run in runs:
        gen = torch.Generator().manual_seed(run["seed"])
        img = pipe(run["prompt"], negative_prompt=run["negative_prompt"], num_inference_steps=run["steps"],
                   guidance_scale=run["guidance_scale"], height=run["height"], width=run["width"],
                   generator=gen, output_type="pil").images[0]
        img.save(os.path.join(REF, f"image_{run['name']}.png"))
        run["image_size"] = list(img.size)
    with open(os.path.join(REF, "pipeline.json"), "w") as f:
        json.dump(runs, f, indent=1)

    save_file(tensors, os.path.join(REF, "reference.safetensors"))

    # clean_caption.
    caps = []
    for c in CAPTIONS:
        caps.append({"input": c, "clean_once": pipe._clean_caption(c),
                     "preprocessed": pipe._text_preprocessing(c, clean_caption=True)[0],
                     "not_cleaned": pipe._text_preprocessing(c, clean_caption=False)[0]})
    with open(os.path.join(REF, "captions.json"), "w") as f:
        json.dump(caps, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    build_model()
    reference()
