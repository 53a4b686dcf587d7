#!/usr/bin/env python3
"""Times one denoiser step of diffusers' models (the peer of `tt-scale bench`) on one device.

Every model is built from constructor arguments written out below (the real architectures'
configs; nothing is downloaded) with PyTorch's default random initialisation, in the compute
dtype, directly on the device. Each benchmark runs `--warmup` untimed steps, then `--iters` timed
steps, the device synchronised around each (CUDA events on CUDA), and reports the median.

Benchmarks (names used as keys of the JSON written by `--json`; bench/gpu-check.sh joins them
with tt-scale's):
  flux_b1, flux_b4        Flux.1-dev transformer, 1024x1024 -> 4096 image tokens, 512 T5 tokens,
                          guidance embeds, batch 1 / 4
  flux_b1_compile, ...    the same under torch.compile (with --compile)
  sdxl                    SDXL base UNet, CFG batch 2, 128x128 latents, text_time add-embedding
  sd15                    SD 1.5 UNet, CFG batch 2, 64x64 latents, 77x768 context
  pixart_sigma            PixArt-Sigma XL/2 transformer, CFG batch 2, 128x128 latents,
                          300 T5 tokens with a mask
  vae_sdxl                SDXL's VAE decoding one 128x128 latent into a 1024x1024 image
  qwen_prefill            transformers' Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-7B-Instruct's
                          config), one 1024x1024 image (74x74 patches -> 1369 image tokens) between
                          QWEN_PREFIX_TOKENS and QWEN_SUFFIX_TOKENS text tokens: one forward pass
                          (vision tower + language model, last-token logits), as `tt-scale bench
                          --model qwen`'s prefill
  qwen_gen                the same prompt through generate(max_new_tokens=300, min_new_tokens=300),
                          greedy (prefill + 300 decode steps)
  clip_l14                transformers' CLIPModel (openai/clip-vit-large-patch14's config) in fp32
                          scoring a batch of --clip-batch (8) preprocessed 224x224 images against
                          one 77-token prompt (image and text features, normalised, cosines), as
                          `tt-scale bench --model clip-l14 --batch 8`

`--small` shrinks every model (few layers, narrow widths, tiny images) so that the script can be
smoke-tested on a CPU: `python3 bench/diffusers_bench.py --device cpu --small --iters 1`.

usage: diffusers_bench.py [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--models flux_b1,sdxl,...]
                          [--warmup N] [--iters N] [--compile] [--small] [--json PATH]
"""

import argparse
import json
import statistics
import sys
import time

import torch

ALL = ["flux_b1", "flux_b4", "sdxl", "sd15", "pixart_sigma", "vae_sdxl", "qwen_prefill", "qwen_gen", "clip_l14"]

# openai/clip-vit-large-patch14 (config.json), the same values as tt-scale's
# `clip_vit_large_patch14_config_json` (src/bench/clip.rs).
CLIP_L14 = dict(
    projection_dim=768,
    text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                       projection_dim=768),
)


def clip_case(device, batch):
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig(**CLIP_L14)).to(device=device, dtype=torch.float32).eval()
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    ids = torch.tensor([[320 + i if i < 76 else 49407 for i in range(77)]], device=device)

    def step():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=ids)
        if not torch.is_tensor(img):
            img, txt = img.pooler_output, txt.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img @ txt.T).cpu()

    details = f"{batch} images 224x224 + 1 prompt of 77 tokens, fp32"
    return model, step, sum(p.numel() for p in model.parameters()), details

# Flux.1-dev transformer (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json); the same
# values as tt-scale's `sdxl_base_unet_json` (src/bench/models.rs).
SDXL_BASE = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    num_attention_heads=None,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default",
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

# Stable Diffusion 1.5 UNet (unet/config.json); tt-scale's `sd15_reference_unet_config`.
SD15 = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=[
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=[
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
)

# PixArt-Sigma XL/2 1024-MS transformer (transformer/config.json); tt-scale's
# `PixArtConfig::sigma_xl_1024` (src/models/pixart.rs).
# SDXL's VAE (stabilityai/stable-diffusion-xl-base-1.0, vae/config.json); tt-scale's
# `sdxl_vae_config` (src/bench/models.rs).
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
)

PIXART_SIGMA = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    dropout=0.0,
    norm_num_groups=32,
    cross_attention_dim=1152,
    attention_bias=True,
    sample_size=128,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    upcast_attention=False,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=2,
    use_additional_conditions=False,
    caption_channels=4096,
    attention_type="default",
)


# Qwen2.5-VL-7B-Instruct (Qwen/Qwen2.5-VL-7B-Instruct, config.json, flat transformers 4.x layout,
# which transformers 5.x also reads); tt-scale's `qwen2_5_vl_7b_config_json`
# (src/bench/qwen.rs).
QWEN_7B = dict(
    architectures=["Qwen2_5_VLForConditionalGeneration"],
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    max_position_embeddings=128000,
    hidden_act="silu",
    tie_word_embeddings=False,
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_chans=3,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
        hidden_act="silu",
    ),
)
# Text tokens before the image (system turn with the grading rubric, an estimate: 2234 characters
# at ~4.3 per token, + template) and after it (prompt + template); the same counts as tt-scale's
# PREFIX_TOKENS / SUFFIX_TOKENS in src/bench/qwen.rs.
QWEN_PREFIX_TOKENS = 520
QWEN_SUFFIX_TOKENS = 40
QWEN_NEW_TOKENS = 300


def shrink(small):
    """The configs and shapes to run: the real ones, or tiny ones for a CPU smoke test."""
    if not small:
        return dict(
            flux=(FLUX_DEV, 1024, 512),
            sdxl=(SDXL_BASE, 1024),
            vae=(SDXL_VAE, 1024),
            sd15=(SD15, 512),
            pixart=(PIXART_SIGMA, 1024, 300),
            qwen=(QWEN_7B, 1024),
        )
    flux = dict(FLUX_DEV, num_layers=1, num_single_layers=2, num_attention_heads=2)
    sdxl = dict(
        SDXL_BASE,
        attention_head_dim=[2, 4, 8],
        block_out_channels=[64, 128, 256],
        transformer_layers_per_block=[1, 1, 1],
        layers_per_block=1,
    )
    sd15 = dict(SD15, block_out_channels=[32, 64, 64, 64], layers_per_block=1)
    pixart = dict(PIXART_SIGMA, num_layers=2)
    qwen = dict(
        QWEN_7B,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        vision_config=dict(
            QWEN_7B["vision_config"],
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
    )
    return dict(
        flux=(flux, 128, 32),
        sdxl=(sdxl, 128),
        sd15=(sd15, 64),
        pixart=(pixart, 128, 32),
        vae=(dict(SDXL_VAE, block_out_channels=[32, 32, 64, 64], layers_per_block=1), 128),
        qwen=(qwen, 224),
    )


def build(cls, config, device, dtype):
    """`cls(**config)` with its parameters made directly in `dtype` on `device` (no fp32 copy
    on the host: the 12 B-parameter Flux transformer would take minutes to initialise there)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    if any(t.is_floating_point() and t.dtype != dtype for t in model.parameters()):
        model = model.to(dtype=dtype)
    model = model.eval()
    model.requires_grad_(False)
    return model


def parameters(model):
    return sum(p.numel() for p in model.parameters())


def randn(shape, device, dtype):
    return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)


def flux_case(cfg, device, dtype, batch, compile_model):
    from diffusers import FluxTransformer2DModel

    config, size, txt_len = cfg
    model = build(FluxTransformer2DModel, config, device, dtype)
    n_params = parameters(model)
    if compile_model:
        model = torch.compile(model)
    rows = cols = size // 16
    img = randn((batch, rows * cols, 64), device, dtype)
    txt = randn((batch, txt_len, config["joint_attention_dim"]), device, dtype)
    pooled = randn((batch, config["pooled_projection_dim"]), device, dtype)
    img_ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    img_ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    img_ids = img_ids.reshape(rows * cols, 3)
    txt_ids = torch.zeros(txt_len, 3, device=device, dtype=dtype)
    # The pipeline passes t/1000 and the guidance scale; the model multiplies both by 1000
    # (tt-scale's bench feeds 500 and 3500 after that scaling).
    t = torch.full((batch,), 0.5, device=device, dtype=dtype)
    g = torch.full((batch,), 3.5, device=device, dtype=dtype)

    def step():
        model(
            hidden_states=img,
            encoder_hidden_states=txt,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )

    details = (
        f"{config['num_layers']} double + {config['num_single_layers']} single blocks, batch {batch}, "
        f"{rows * cols} image + {txt_len} text tokens" + (", torch.compile" if compile_model else "")
    )
    return model, step, n_params, details


def sdxl_case(cfg, device, dtype, batch):
    from diffusers import UNet2DConditionModel

    config, size = cfg
    model = build(UNet2DConditionModel, config, device, dtype)
    rows = 2 * batch
    h = w = size // 8
    sample = randn((rows, 4, h, w), device, dtype)
    context = randn((rows, 77, config["cross_attention_dim"]), device, dtype)
    text_embeds = randn((rows, 1280), device, dtype)
    time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=dtype).repeat(rows, 1)
    t = torch.full((rows,), 981.0, device=device, dtype=dtype)

    def step():
        model(
            sample,
            t,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )

    details = f"sample {list(sample.shape)}, context {list(context.shape)}, text_embeds {list(text_embeds.shape)}"
    return model, step, parameters(model), details


def sd15_case(cfg, device, dtype, batch):
    from diffusers import UNet2DConditionModel

    config, size = cfg
    model = build(UNet2DConditionModel, config, device, dtype)
    rows = 2 * batch
    h = w = size // 8
    sample = randn((rows, 4, h, w), device, dtype)
    context = randn((rows, 77, config["cross_attention_dim"]), device, dtype)
    t = torch.full((rows,), 981.0, device=device, dtype=dtype)

    def step():
        model(sample, t, encoder_hidden_states=context, return_dict=False)

    details = f"sample {list(sample.shape)}, context {list(context.shape)}"
    return model, step, parameters(model), details


def pixart_case(cfg, device, dtype, batch):
    from diffusers import PixArtTransformer2DModel

    config, size, txt_len = cfg
    model = build(PixArtTransformer2DModel, config, device, dtype)
    rows = 2 * batch
    h = w = size // 8
    sample = randn((rows, 4, h, w), device, dtype)
    context = randn((rows, txt_len, config["caption_channels"]), device, dtype)
    mask = torch.ones(rows, txt_len, device=device, dtype=dtype)
    t = torch.full((rows,), 999, device=device, dtype=torch.long)

    def step():
        model(
            sample,
            encoder_hidden_states=context,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=mask,
            return_dict=False,
        )

    details = f"{config['num_layers']} blocks, sample {list(sample.shape)}, context {list(context.shape)}, mask"
    return model, step, parameters(model), details


def qwen_case(cfg, device, dtype, generate):
    """Qwen2.5-VL from its config with random weights: one `size`x`size` image's prefill, or
    (`generate`) the prefill plus QWEN_NEW_TOKENS greedy tokens through `generate`."""
    import inspect

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config, size = cfg
    model = build(Qwen2_5_VLForConditionalGeneration, dict(config=Qwen2_5_VLConfig(**config)), device, dtype)
    vc = config["vision_config"]
    patch, merge, temporal = vc["patch_size"], vc["spatial_merge_size"], vc["temporal_patch_size"]
    # The processor's smart_resize for a square image well inside min/max pixels: the side
    # rounded to a multiple of 28 (1024 -> 1036, 224 -> 224).
    factor = patch * merge
    side = max(factor, round(size / factor) * factor)
    grid = side // patch
    n_img = grid * grid // (merge * merge)
    pixel_values = randn((grid * grid, 3 * temporal * patch * patch), device, dtype)
    grid_thw = torch.tensor([[1, grid, grid]], device=device, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 151643, (n,), generator=gen)  # ordinary (non-special) tokens
    image = torch.full((n_img,), config["image_token_id"], dtype=torch.long)
    ids = torch.cat([text(QWEN_PREFIX_TOKENS), image, text(QWEN_SUFFIX_TOKENS)]).unsqueeze(0).to(device)
    mask = torch.ones_like(ids)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid_thw)
    if generate:

        def step():
            out = model.generate(
                **inputs,
                max_new_tokens=QWEN_NEW_TOKENS,
                min_new_tokens=QWEN_NEW_TOKENS,
                do_sample=False,
                eos_token_id=config["eos_token_id"],
                pad_token_id=config["bos_token_id"],
            )
            assert out.shape[1] == ids.shape[1] + QWEN_NEW_TOKENS, out.shape

    else:
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

        def step():
            model(**inputs, use_cache=True, **extra)

    details = (
        f"{size}x{size} image -> grid {grid}x{grid} patches, {n_img} image + "
        f"{QWEN_PREFIX_TOKENS + QWEN_SUFFIX_TOKENS} text tokens ({ids.shape[1]} in all), "
        f"{config['num_hidden_layers']} LM layers, {vc['depth']} vision blocks"
        + (f"; generate {QWEN_NEW_TOKENS} tokens, greedy" if generate else "; one forward pass")
        + f", attention {model.config._attn_implementation}"
    )
    return model, step, parameters(model), details


def time_step(step, device, warmup, iters):
    """Milliseconds of each of `iters` timed calls of `step`, after `warmup` untimed ones."""
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(max(iters, 1)):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def vae_case(cfg, device, dtype, batch):
    from diffusers import AutoencoderKL

    config, size = cfg
    model = build(AutoencoderKL, config, device, dtype)
    z = randn((batch, config["latent_channels"], size // 8, size // 8), device, dtype)

    def step():
        model.decode(z, return_dict=False)

    details = f"latents {list(z.shape)} -> images [{batch}, 3, {size}, {size}]"
    return model, step, sum(p.numel() for p in model.decoder.parameters()) + sum(
        p.numel() for p in model.post_quant_conv.parameters()
    ), details


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--models", default=",".join(ALL), help=f"comma-separated, from: {', '.join(ALL)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the Flux cases under torch.compile")
    p.add_argument("--compile-only", action="store_true", help="time only the torch.compile Flux cases")
    p.add_argument("--small", action="store_true", help="tiny models and images (CPU smoke test)")
    p.add_argument("--json", help="write {name: median_ms} here (rewritten after each benchmark)")
    p.add_argument("--clip-batch", type=int, default=8, help="images per clip_l14 step")
    a = p.parse_args()

    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ALL]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {ALL}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no GPU here; use --device cpu --small")
    dtype_name = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if any(not m.startswith("qwen") and m != "clip_l14" for m in models):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        print(f"# diffusers {diffusers.__version__}, {dtype_name} on {a.device}{' (small)' if a.small else ''}", flush=True)
    if any(m.startswith("qwen") or m == "clip_l14" for m in models):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        print(f"# transformers {transformers.__version__}, {dtype_name} on {a.device}", flush=True)

    cfg = shrink(a.small)
    cases = []
    for m in models:
        if m.startswith("flux_b"):
            batch = int(m[len("flux_b"):])
            if not a.compile_only:
                cases.append((m, lambda b=batch: flux_case(cfg["flux"], a.device, dtype, b, False)))
            if a.compile or a.compile_only:
                cases.append((m + "_compile", lambda b=batch: flux_case(cfg["flux"], a.device, dtype, b, True)))
        elif m == "clip_l14" and not a.compile_only:
            cases.append((m, lambda: clip_case(a.device, a.clip_batch)))
        elif m.startswith("qwen") and not a.compile_only:
            cases.append((m, lambda g=(m == "qwen_gen"): qwen_case(cfg["qwen"], a.device, dtype, g)))
        elif not a.compile_only:
            make = {"sdxl": sdxl_case, "sd15": sd15_case, "pixart_sigma": pixart_case, "vae_sdxl": vae_case}[m]
            key = {"sdxl": "sdxl", "sd15": "sd15", "pixart_sigma": "pixart", "vae_sdxl": "vae"}[m]
            cases.append((m, lambda make=make, key=key: make(cfg[key], a.device, dtype, 1)))

    results = {}
    rows = []
    failed = False
    for name, make in cases:
        try:
            t0 = time.perf_counter()
            model, step, n_params, details = make()
            built = time.perf_counter() - t0
            times = time_step(step, a.device, a.warmup, a.iters)
        except Exception as e:  # report and go on with the next benchmark
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            failed = True
            continue
        finally:
            model = step = None
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
        med = statistics.median(times)
        results[name] = round(med, 3)
        rows.append((name, med, min(times), max(times), len(times), n_params))
        print(
            f"{name}: median {med:.2f} ms (min {min(times):.2f}, max {max(times):.2f}, {len(times)} iters, "
            f"{n_params / 1e6:.1f} M params, built in {built:.1f} s): {details}",
            flush=True,
        )
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)

    print()
    print(f"{'benchmark':<20} {'median ms':>11} {'min ms':>11} {'max ms':>11} {'iters':>6} {'parameters':>14}")
    for name, med, lo, hi, n, n_params in rows:
        print(f"{name:<20} {med:>11.2f} {lo:>11.2f} {hi:>11.2f} {n:>6} {n_params:>14}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
