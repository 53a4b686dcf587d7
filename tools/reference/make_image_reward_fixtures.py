#!/usr/bin/env python3
"""Builds a tiny random-weight ImageReward v1.0 model in the published layout and its reference
scores, for the `image_reward` verifier.

ImageReward (THUDM/ImageReward, ImageReward/ImageReward.py) is BLIP's ViT image encoder, BLIP's
"med" BERT text encoder with a cross-attention block in every layer (models/BLIP/med.py; no
token-type embeddings, additive mask (1 - m) * -10000), and a five-layer linear MLP on the text
encoder's first token, normalised by (r - 0.16717362830052426) / 1.0333394966054072. The
`image-reward` package pulls timm, fairscale and a torchvision that does not match the torch
here, so the model and its preprocessing are a faithful re-implementation in plain torch and
Pillow of that code (BLIP's models/vit.py VisionTransformer: timm-style pre-norm blocks, LayerNorm
eps 1e-6, exact GELU; med.py's BertModel in "multimodal" mode). The tokenizer is transformers'
slow BertTokenizer with BLIP's two added tokens ([DEC] as bos, [ENC] as additional special
token), on a small uncased WordPiece vocabulary.

Run by hand (never in CI) from the crate root, with torch, transformers < 5 (transformers 5 has
no slow BertTokenizer, the class BLIP tokenizes with) and Pillow installed:

    python tools/reference/make_image_reward_fixtures.py

Needs tests/fixtures/clip/image_*.png (tools/reference/make_clip_fixtures.py) and
tests/fixtures/hpsv2/odd.png (make_hpsv2_fixtures.py). Writes tests/fixtures/image-reward/:
  ImageReward.pt              torch.save(state_dict) with ImageReward's names (blip.visual_encoder.*,
                              blip.text_encoder.*, blip.vision_proj/text_proj, mlp.layers.*)
  med_config.json             the BERT config as ImageReward's Hub repo ships it (with the tiny sizes)
  blip_vision_config.json     the ViT sizes (tt-scale reads it when present; ViT-L/16 otherwise)
  bert-tokenizer/             vocab.txt and tokenizer.json (the fast tokenizer without BLIP's
                              added tokens, as google-bert/bert-base-uncased ships it)
  reference.safetensors       input ids per prompt; per image the pixel values (every 13th and
                              the sum); the scores per (image, prompt) in float32 and float64
  meta.json                   prompts, images
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import BertTokenizer, BertTokenizerFast, PreTrainedTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_hpsv2_fixtures import preprocess  # noqa: E402  (the same torchvision transform)

OUT = "tests/fixtures/image-reward"
IMAGES = [f"tests/fixtures/clip/image_{i}.png" for i in range(3)] + ["tests/fixtures/hpsv2/odd.png"]
PROMPTS = [
    "a photo of a cat",
    "An Astronaut riding a HORSE on the moon, oil painting! [ENC]",
    "a red cat and a blue dog and a green bird and a small house on a hill under the moon at "
    "night with many stars and a river, a tree, a boat, a horse, a painting of a cat",
]
MEAN, STD = 0.16717362830052426, 1.0333394966054072

WORDS = (
    "a an the of on and at with under many small red blue green photo cat dog bird house hill "
    "moon night star river tree boat horse painting oil astronaut riding"
).split()
SUFFIXES = ["##s", "##ing", "##er", "##ed"]
VISION = {"image_size": 224, "patch_size": 16, "hidden_size": 48, "depth": 2, "num_heads": 3,
          "mlp_ratio": 4.0}
MED = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": None,
    "encoder_width": 48,
    "add_cross_attention": True,
}
MLP_WIDTHS = [1024, 128, 64, 16, 1]


def write_tokenizer():
    """A small uncased WordPiece vocabulary; returns BLIP's slow tokenizer (init_tokenizer)."""
    folder = os.path.join(OUT, "bert-tokenizer")
    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + list(",.!?'-[]") + letters + ["##" + c for c in letters] + WORDS + SUFFIXES)
    vocab = list(dict.fromkeys(vocab))  # one id per token
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    fast = BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt"), do_lower_case=True)
    fast.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    if not issubclass(BertTokenizer, PreTrainedTokenizer):
        sys.exit("needs transformers < 5: BLIP tokenizes with the slow (Python) BertTokenizer")
    slow = BertTokenizer(vocab_file=os.path.join(folder, "vocab.txt"), do_lower_case=True)
    slow.add_special_tokens({"bos_token": "[DEC]"})
    slow.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return slow


def state_dict(vocab):
    torch.manual_seed(0)
    v, t = VISION, MED
    w, tw, ew = v["hidden_size"], t["hidden_size"], t["encoder_width"]
    grid = v["image_size"] // v["patch_size"]
    p = v["patch_size"]

    def lin(name, out, inp):
        sd[f"{name}.weight"] = torch.randn(out, inp) / inp**0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(out)

    def norm(name, width):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(width)
        sd[f"{name}.bias"] = 0.1 * torch.randn(width)

    sd = {
        "blip.visual_encoder.cls_token": torch.randn(1, 1, w) / w**0.5,
        "blip.visual_encoder.pos_embed": torch.randn(1, grid * grid + 1, w) / w**0.5,
        "blip.visual_encoder.patch_embed.proj.weight": torch.randn(w, 3, p, p) / (3 * p * p) ** 0.5,
        "blip.visual_encoder.patch_embed.proj.bias": 0.1 * torch.randn(w),
        "blip.text_encoder.embeddings.word_embeddings.weight": torch.randn(vocab, tw) / tw**0.5,
        "blip.text_encoder.embeddings.position_embeddings.weight":
            torch.randn(t["max_position_embeddings"], tw) / tw**0.5,
        "blip.text_encoder.embeddings.position_ids":
            torch.arange(t["max_position_embeddings"]).expand((1, -1)).contiguous(),
    }
    norm("blip.visual_encoder.norm", w)
    for i in range(v["depth"]):
        b = f"blip.visual_encoder.blocks.{i}"
        norm(f"{b}.norm1", w)
        lin(f"{b}.attn.qkv", 3 * w, w)
        lin(f"{b}.attn.proj", w, w)
        norm(f"{b}.norm2", w)
        lin(f"{b}.mlp.fc1", int(w * v["mlp_ratio"]), w)
        lin(f"{b}.mlp.fc2", w, int(w * v["mlp_ratio"]))
    norm("blip.text_encoder.embeddings.LayerNorm", tw)
    for i in range(t["num_hidden_layers"]):
        b = f"blip.text_encoder.encoder.layer.{i}"
        for part, kv_width in [("attention", tw), ("crossattention", ew)]:
            lin(f"{b}.{part}.self.query", tw, tw)
            lin(f"{b}.{part}.self.key", tw, kv_width)
            lin(f"{b}.{part}.self.value", tw, kv_width)
            lin(f"{b}.{part}.output.dense", tw, tw)
            norm(f"{b}.{part}.output.LayerNorm", tw)
        lin(f"{b}.intermediate.dense", t["intermediate_size"], tw)
        lin(f"{b}.output.dense", tw, t["intermediate_size"])
        norm(f"{b}.output.LayerNorm", tw)
    # BLIP_Pretrain's projections: in the checkpoint, unused by the score.
    lin("blip.vision_proj", 256, w)
    lin("blip.text_proj", 256, tw)
    width = tw
    for idx, out in zip([0, 2, 4, 6, 7], MLP_WIDTHS):
        lin(f"mlp.layers.{idx}", out, width)
        width = out
    return sd


def vit(sd, pixels):
    """BLIP's VisionTransformer.forward: patch embedding, [cls], pos_embed, blocks, final norm."""
    v = VISION
    w, heads = v["hidden_size"], v["num_heads"]
    pre = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{pre}.patch_embed.proj.weight"], sd[f"{pre}.patch_embed.proj.bias"],
                 stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{pre}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[f"{pre}.pos_embed"][:, : x.shape[1], :]
    for i in range(v["depth"]):
        b = f"{pre}.blocks.{i}"
        h = F.layer_norm(x, (w,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], 1e-6)
        n = h.shape[1]
        qkv = (h @ sd[f"{b}.attn.qkv.weight"].T + sd[f"{b}.attn.qkv.bias"])
        qkv = qkv.reshape(h.shape[0], n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        q, k, val = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (w // heads) ** -0.5).softmax(dim=-1)
        o = (att @ val).transpose(1, 2).reshape(h.shape[0], n, w)
        x = x + o @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
        h = F.layer_norm(x, (w,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], 1e-6)
        h = F.gelu(h @ sd[f"{b}.mlp.fc1.weight"].T + sd[f"{b}.mlp.fc1.bias"])
        x = x + h @ sd[f"{b}.mlp.fc2.weight"].T + sd[f"{b}.mlp.fc2.bias"]
    return F.layer_norm(x, (w,), sd[f"{pre}.norm.weight"], sd[f"{pre}.norm.bias"], 1e-6)


def bert_attention(sd, p, hidden, kv, mask):
    """med.py's BertAttention: BertSelfAttention then BertSelfOutput (dense, residual, LayerNorm)."""
    t = MED
    heads, width = t["num_attention_heads"], t["hidden_size"]
    hd = width // heads
    b, n, _ = hidden.shape
    m = kv.shape[1]
    q = (hidden @ sd[f"{p}.self.query.weight"].T + sd[f"{p}.self.query.bias"])
    k = (kv @ sd[f"{p}.self.key.weight"].T + sd[f"{p}.self.key.bias"])
    val = (kv @ sd[f"{p}.self.value.weight"].T + sd[f"{p}.self.value.bias"])
    q = q.view(b, n, heads, hd).permute(0, 2, 1, 3)
    k = k.view(b, m, heads, hd).permute(0, 2, 1, 3)
    val = val.view(b, m, heads, hd).permute(0, 2, 1, 3)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5 + mask
    ctx = (scores.softmax(dim=-1) @ val).permute(0, 2, 1, 3).reshape(b, n, width)
    out = ctx @ sd[f"{p}.output.dense.weight"].T + sd[f"{p}.output.dense.bias"]
    return F.layer_norm(out + hidden, (width,), sd[f"{p}.output.LayerNorm.weight"],
                        sd[f"{p}.output.LayerNorm.bias"], t["layer_norm_eps"])


def text_encoder(sd, ids, attention_mask, image_embeds):
    """med.py's BertModel.forward(mode='multimodal'): embeddings (word + absolute position,
    LayerNorm), then per layer self-attention, cross-attention to the image, feed-forward."""
    t = MED
    width, eps = t["hidden_size"], t["layer_norm_eps"]
    pre = "blip.text_encoder"
    n = ids.shape[1]
    x = sd[f"{pre}.embeddings.word_embeddings.weight"][ids] + \
        sd[f"{pre}.embeddings.position_embeddings.weight"][:n]
    x = F.layer_norm(x, (width,), sd[f"{pre}.embeddings.LayerNorm.weight"],
                     sd[f"{pre}.embeddings.LayerNorm.bias"], eps)
    ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    enc = (1.0 - image_atts[:, None, None, :].to(x.dtype)) * -10000.0
    for i in range(t["num_hidden_layers"]):
        p = f"{pre}.encoder.layer.{i}"
        x = bert_attention(sd, f"{p}.attention", x, x, ext)
        x = bert_attention(sd, f"{p}.crossattention", x, image_embeds, enc)
        h = F.gelu(x @ sd[f"{p}.intermediate.dense.weight"].T + sd[f"{p}.intermediate.dense.bias"])
        h = h @ sd[f"{p}.output.dense.weight"].T + sd[f"{p}.output.dense.bias"]
        x = F.layer_norm(h + x, (width,), sd[f"{p}.output.LayerNorm.weight"],
                         sd[f"{p}.output.LayerNorm.bias"], eps)
    return x


def score(sd, ids, mask, pixels):
    """ImageReward.score for one image and one prompt (batched over images)."""
    image_embeds = vit(sd, pixels)
    b = pixels.shape[0]
    text = text_encoder(sd, ids.expand(b, -1), mask.expand(b, -1), image_embeds)
    x = text[:, 0, :]
    for idx in [0, 2, 4, 6, 7]:
        x = x @ sd[f"mlp.layers.{idx}.weight"].T + sd[f"mlp.layers.{idx}.bias"]
    return ((x - MEAN) / STD).squeeze(1)


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizer = write_tokenizer()
    MED["vocab_size"] = len(tokenizer)
    sd = state_dict(len(tokenizer))
    torch.save(sd, os.path.join(OUT, "ImageReward.pt"))
    with open(os.path.join(OUT, "med_config.json"), "w") as f:
        json.dump(MED, f, indent=2)
    with open(os.path.join(OUT, "blip_vision_config.json"), "w") as f:
        json.dump(VISION, f, indent=1)
    images = [Image.open(p).convert("RGB") for p in IMAGES]
    pixels = torch.stack([preprocess(im) for im in images])
    flat = pixels.flatten()
    tensors = {"pixel_values_sample": flat[::13].contiguous(),
               "pixel_values_sum": flat.double().sum().reshape(1)}
    encoded = [tokenizer(p, padding="max_length", truncation=True, max_length=35,
                         return_tensors="pt") for p in PROMPTS]
    for i, e in enumerate(encoded):
        tensors[f"input_ids_{i}"] = e["input_ids"][0].to(torch.int64).contiguous()
        tensors[f"attention_mask_{i}"] = e["attention_mask"][0].to(torch.int64).contiguous()
    for dtype, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
        w = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        rows = []
        with torch.no_grad():
            for e in encoded:
                rows.append(score(w, e["input_ids"], e["attention_mask"], pixels.to(dtype)))
        tensors[f"score_{tag}"] = torch.stack(rows, dim=1).contiguous()  # (image, prompt)
    save_file(tensors, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "images": IMAGES, "torch": torch.__version__}, f, indent=1)
    print("ids", [e["input_ids"][0].tolist() for e in encoded])
    print("scores f32", tensors["score_f32"])
    print("f32 vs f64", (tensors["score_f32"].double() - tensors["score_f64"]).abs().max().item())


if __name__ == "__main__":
    main()
