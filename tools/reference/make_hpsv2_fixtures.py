#!/usr/bin/env python3
"""Builds a tiny random-weight HPS v2.1-style checkpoint (an OpenCLIP ViT in open_clip's state-dict
layout, saved as {"state_dict": ...} like HPS_v2.1_compressed.pt) and its reference scores, for
the `hpsv2` verifier.

The hpsv2 and open_clip packages pull torchvision builds that do not match the torch here, so the
model and its preprocessing are a faithful re-implementation of open_clip's (open_clip/model.py,
transformer.py, transform.py: VisionTransformer, TextTransformer, `image_transform(224,
is_train=False)`) in plain torch and Pillow; the score is HPSv2's: the cosine of the normalised
image and text features.

Run by hand (never in CI) from the crate root, with torch, transformers and Pillow installed:

    python tools/reference/make_hpsv2_fixtures.py

Needs tests/fixtures/clip/image_*.png (tools/reference/make_clip_fixtures.py) and the tiny CLIP
tokenizer (tests/fixtures/tiny-clip). Writes tests/fixtures/hpsv2/:
  HPS_v2.1_compressed.pt      torch.save({"state_dict": state_dict}) with open_clip's names
  open_clip_config.json       {"model_cfg": {embed_dim, vision_cfg, text_cfg}} as open_clip's
                              Hub repos ship it
  reference.safetensors       per image: pixel values (every 13th and the sum), the scores
                              against each prompt in float32 and float64
  meta.json                   prompts, images
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

OUT = "tests/fixtures/hpsv2"
IMAGES = [f"tests/fixtures/clip/image_{i}.png" for i in range(3)]
TOKENIZER = "tests/fixtures/tiny-clip"
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting"]
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 48, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": None, "width": 32, "heads": 2, "layers": 2},
}


def block(sd, p, width, mlp):
    sd[f"{p}.ln_1.weight"] = 1 + 0.1 * torch.randn(width)
    sd[f"{p}.ln_1.bias"] = 0.1 * torch.randn(width)
    sd[f"{p}.attn.in_proj_weight"] = torch.randn(3 * width, width) / width**0.5
    sd[f"{p}.attn.in_proj_bias"] = 0.1 * torch.randn(3 * width)
    sd[f"{p}.attn.out_proj.weight"] = torch.randn(width, width) / width**0.5
    sd[f"{p}.attn.out_proj.bias"] = 0.1 * torch.randn(width)
    sd[f"{p}.ln_2.weight"] = 1 + 0.1 * torch.randn(width)
    sd[f"{p}.ln_2.bias"] = 0.1 * torch.randn(width)
    sd[f"{p}.mlp.c_fc.weight"] = torch.randn(mlp, width) / width**0.5
    sd[f"{p}.mlp.c_fc.bias"] = 0.1 * torch.randn(mlp)
    sd[f"{p}.mlp.c_proj.weight"] = torch.randn(width, mlp) / mlp**0.5
    sd[f"{p}.mlp.c_proj.bias"] = 0.1 * torch.randn(width)


def state_dict(vocab):
    torch.manual_seed(0)
    v, t, e = CFG["vision_cfg"], CFG["text_cfg"], CFG["embed_dim"]
    w, tw = v["width"], t["width"]
    grid = v["image_size"] // v["patch_size"]
    sd = {
        "visual.class_embedding": torch.randn(w) / w**0.5,
        "visual.positional_embedding": torch.randn(grid * grid + 1, w) / w**0.5,
        "visual.proj": torch.randn(w, e) / w**0.5,
        "visual.conv1.weight": torch.randn(w, 3, v["patch_size"], v["patch_size"]) / (3 * 196) ** 0.5,
        "visual.ln_pre.weight": 1 + 0.1 * torch.randn(w),
        "visual.ln_pre.bias": 0.1 * torch.randn(w),
        "visual.ln_post.weight": 1 + 0.1 * torch.randn(w),
        "visual.ln_post.bias": 0.1 * torch.randn(w),
        "token_embedding.weight": torch.randn(vocab, tw) / tw**0.5,
        "positional_embedding": torch.randn(t["context_length"], tw) / tw**0.5,
        "ln_final.weight": 1 + 0.1 * torch.randn(tw),
        "ln_final.bias": 0.1 * torch.randn(tw),
        "text_projection": torch.randn(tw, e) / tw**0.5,
        "logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32),
    }
    for i in range(v["layers"]):
        block(sd, f"visual.transformer.resblocks.{i}", w, 4 * w)
    for i in range(t["layers"]):
        block(sd, f"transformer.resblocks.{i}", tw, 4 * tw)
    return sd


def resblock(x, sd, p, heads, mask):
    """open_clip's ResidualAttentionBlock (pre-norm, nn.MultiheadAttention, GELU MLP)."""
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-5)
    qkv = h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
    q, k, v = qkv.chunk(3, dim=-1)
    b, n, _ = q.shape
    split = lambda t: t.reshape(b, n, heads, width // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    att = (q @ k.transpose(-1, -2)) / (width // heads) ** 0.5
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
    x = x + o @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = F.layer_norm(x, (width,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-5)
    h = F.gelu(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"])
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def encode_image(sd, pixels):
    v = CFG["vision_cfg"]
    w = v["width"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, w)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(v["layers"]):
        x = resblock(x, sd, f"visual.transformer.resblocks.{i}", w // v["head_width"], None)
    pooled = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return pooled @ sd["visual.proj"]


def encode_text(sd, ids):
    t = CFG["text_cfg"]
    tw = t["width"]
    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(t["layers"]):
        x = resblock(x, sd, f"transformer.resblocks.{i}", t["heads"], mask)
    x = F.layer_norm(x, (tw,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def preprocess(img):
    """open_clip's image_transform(224, is_train=False) on a PIL image: torchvision's Resize(224,
    BICUBIC) (the shorter edge to 224, the other int(224 * long / short), Pillow's resize), its
    CenterCrop(224) (offsets int(round((h - 224) / 2.0)), round half to even), ToTensor, Normalize."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != 224:
        new_long = int(224 * long / short)
        img = img.resize((224, new_long) if w <= h else (new_long, 224), Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def main():
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    CFG["text_cfg"]["vocab_size"] = len(tokenizer)
    sd = state_dict(len(tokenizer))
    os.makedirs(OUT, exist_ok=True)
    torch.save({"state_dict": sd}, os.path.join(OUT, "HPS_v2.1_compressed.pt"))
    with open(os.path.join(OUT, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": CFG}, f, indent=1)
    # A 301x201 crop of the first image too: odd margins, where round-half-even and floor differ.
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    odd = images[0].resize((301, 201), Image.BICUBIC)
    odd.save(os.path.join(OUT, "odd.png"))
    images.append(Image.open(os.path.join(OUT, "odd.png")).convert("RGB"))
    pixels = torch.stack([preprocess(im) for im in images])
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")["input_ids"]
    flat = pixels.flatten()
    tensors = {"pixel_values_sample": flat[::13].contiguous(), "pixel_values_sum": flat.double().sum().reshape(1)}
    for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
        w = {k: v.to(dtype) for k, v in sd.items()}
        with torch.no_grad():
            img = encode_image(w, pixels.to(dtype))
            txt = encode_text(w, ids)
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
        tensors[f"score_{tag}"] = (img @ txt.T).contiguous()
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "images": IMAGES + [f"{OUT}/odd.png"], "torch": torch.__version__}, f, indent=1)
    print("scores f32", tensors["score_f32"])


if __name__ == "__main__":
    main()
