#!/usr/bin/env python3
"""Builds a tiny random-weight CLIP (transformers' CLIPModel layout) and a tiny LAION-style
aesthetic MLP (a PyTorch pickle with the original's `layers.{0,2,4,6,7}` keys), and their
reference outputs, for the `laion_aesthetic` and `clip_score` verifiers.

Run by hand (never in CI) from the crate root, with torch and transformers installed:

    python tools/reference/make_clip_fixtures.py

Needs the tiny SD 1.5 tokenizer (tests/fixtures/tiny-sd15/tokenizer, a CLIP BPE vocabulary).
Writes
  tests/fixtures/tiny-clip/       config.json, model.safetensors, preprocessor_config.json,
                                  vocab.json, merges.txt, tokenizer_config.json,
                                  special_tokens_map.json (as save_pretrained writes them)
  tests/fixtures/clip/
    aesthetic-model.pth           torch.save(state_dict) of the original's MLP class (dropouts
                                  between the linears), with tiny widths
    image_<i>.png                 the test images: two non-square, one already 224x224
    reference.safetensors         pixel_values (the CLIPImageProcessor's, every 13th value and
                                  the sum), input_ids, and from
                                  the model in float32 and float64: image_embeds, text_embeds,
                                  cosine (images x prompts), aesthetic (per image, eval mode)
    meta.json                     prompts, image names, versions
"""

import json
import os
import shutil

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

MODEL = "tests/fixtures/tiny-clip"
OUT = "tests/fixtures/clip"
TOKENIZER = "tests/fixtures/tiny-sd15/tokenizer"
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting"]


class MLP(torch.nn.Module):
    """The aesthetic head of tt-scale-flux / improved-aesthetic-predictor (its widths are
    parameters here so that the fixture stays small; the real one is 768-1024-128-64-16-1)."""

    def __init__(self, widths):
        super().__init__()
        a, b, c, d, e = widths
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(a, b),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(b, c),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(c, d),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(d, e),
            torch.nn.Linear(e, 1),
        )

    def forward(self, x):
        return self.layers(x)


def images():
    rng = np.random.default_rng(7)
    out = []
    for w, h in [(300, 200), (150, 260), (224, 224)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack(
            [
                128 + 100 * np.sin(xx / 17.0),
                128 + 100 * np.cos(yy / 11.0),
                (xx + yy) % 256,
            ],
            axis=-1,
        )
        noise = rng.integers(-30, 31, size=base.shape)
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return out


def main():
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
            hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    model = CLIPModel(config).eval()
    if os.path.isdir(MODEL):
        shutil.rmtree(MODEL)
    model.save_pretrained(MODEL, safe_serialization=True)
    # The slow tokenizer's files, as openai/clip-vit-large-patch14 ships them.
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(TOKENIZER, name), os.path.join(MODEL, name))
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
    )
    processor.save_pretrained(MODEL)

    mlp = MLP([24, 32, 16, 8, 4]).eval()
    os.makedirs(OUT, exist_ok=True)
    torch.save(mlp.state_dict(), os.path.join(OUT, "aesthetic-model.pth"))

    imgs = images()
    names = []
    for i, img in enumerate(imgs):
        name = f"image_{i}.png"
        img.save(os.path.join(OUT, name))
        names.append(name)
    # Read back, as the verifier gets them from PNG files.
    imgs = [Image.open(os.path.join(OUT, n)).convert("RGB") for n in names]
    pixel_values = processor(images=imgs, return_tensors="pt")["pixel_values"]
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")["input_ids"]

    # Every 13th value of the processor's output (the whole would be 1.8 MB) and the sum.
    flat = pixel_values.flatten()
    tensors = {
        "pixel_values_sample": flat[::13].contiguous(),
        "pixel_values_sum": flat.double().sum().reshape(1),
        "input_ids": ids.to(torch.int64),
    }
    for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
        m = CLIPModel.from_pretrained(MODEL, torch_dtype=dtype).eval()
        head = MLP([24, 32, 16, 8, 4]).to(dtype).eval()
        head.load_state_dict(torch.load(os.path.join(OUT, "aesthetic-model.pth")))
        with torch.no_grad():
            img_emb = m.get_image_features(pixel_values=pixel_values.to(dtype))
            txt_emb = m.get_text_features(input_ids=ids)
            if not torch.is_tensor(img_emb):
                img_emb, txt_emb = img_emb.pooler_output, txt_emb.pooler_output
            img_n = img_emb / img_emb.norm(dim=-1, keepdim=True)
            txt_n = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
            cosine = img_n @ txt_n.T
            aesthetic = head(img_n).squeeze(-1)
        tensors[f"image_embeds_{tag}"] = img_emb.contiguous()
        tensors[f"text_embeds_{tag}"] = txt_emb.contiguous()
        tensors[f"cosine_{tag}"] = cosine.contiguous()
        tensors[f"aesthetic_{tag}"] = aesthetic.contiguous()
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(
            {
                "prompts": PROMPTS,
                "images": names,
                "logit_scale": float(model.logit_scale.item()),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            f,
            indent=1,
        )
    print("cosine f32", tensors["cosine_f32"], "aesthetic f32", tensors["aesthetic_f32"])


if __name__ == "__main__":
    main()
