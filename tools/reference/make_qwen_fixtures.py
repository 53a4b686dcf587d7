#!/usr/bin/env python3
"""Builds the tiny random-weight Qwen2.5-VL model and its reference outputs.

Run by hand (never in CI) from the crate root with the reference venv:

    /work/venv/bin/python tools/reference/make_qwen_fixtures.py

Writes
  tests/fixtures/tiny-qwen/   a tiny Qwen2.5-VL in the Hugging Face layout: config.json,
                              model.safetensors (f32), tokenizer.json (a byte-level BPE trained
                              here on a small English + JSON corpus, with Qwen's special tokens),
                              tokenizer_config.json, preprocessor_config.json, chat_template.json
  tests/fixtures/qwen/
    image.png                 the 90x60 test image (resized by the processor to 84x56)
    reference.safetensors     pixel_values, image_grid_thw, vision features, input_ids,
                              mrope position ids, logits (prompt, then prompt + 3 tokens)
    reference.json            the chat's system and user text, the extra tokens, the ids
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests/fixtures/tiny-qwen")
REF = os.path.join(ROOT, "tests/fixtures/qwen")

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the Hub repo).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    open(os.path.join(ROOT, "src/verifiers/rubric.txt")).read(),
    '{"accuracy_to_prompt": {"explanation": "The image shows a cat.", "score": 7.5}, '
    '"creativity_and_originality": {"explanation": "Fresh.", "score": 8}, '
    '"visual_quality_and_realism": {"explanation": "Sharp.", "score": 9}, '
    '"consistency_and_cohesion": {"explanation": "Good.", "score": 6}, '
    '"emotional_or_thematic_resonance": {"explanation": "Calm.", "score": 5}, '
    '"overall_score": {"explanation": "Nice overall.", "score": 10}}',
    "a tiny astronaut hatching from an egg on the moon. The picture is blurry but bright, "
    "colors are vivid and the composition is balanced; 0 1 2 3 4 5 6 7 8 9 10 . , : ; ! ?",
]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    return fast


def main():
    torch.manual_seed(0)
    os.makedirs(MODEL, exist_ok=True)
    os.makedirs(REF, exist_ok=True)

    fast = make_tokenizer()
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIALS}
    vocab = len(fast)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=56,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Larger-than-default weights so that the parity checks see non-trivial activations.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_q" in name or "norm1" in name or "norm2" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(MODEL, safe_serialization=True)

    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(MODEL)
    # preprocessor_config.json as the Hub repos write it (min_pixels / max_pixels keys).
    preprocessor = {
        "min_pixels": 28 * 28,
        "max_pixels": 28 * 28 * 16,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    with open(os.path.join(MODEL, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(MODEL, "chat_template.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2)
    # Trim files the Rust side does not read.
    for extra in ["generation_config.json", "special_tokens_map.json", "chat_template.jinja"]:
        p = os.path.join(MODEL, extra)
        if os.path.exists(p):
            os.remove(p)

    # The test image: a smooth pattern with sharp edges, 90 wide x 60 high.
    yy, xx = np.mgrid[0:60, 0:90]
    img = np.stack(
        [
            (xx * 255 // 89),
            (yy * 255 // 59),
            ((xx // 7 + yy // 5) % 2) * 200 + 20,
        ],
        axis=-1,
    ).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(REF, "image.png"))
    image = Image.open(os.path.join(REF, "image.png")).convert("RGB")

    # No torchvision here: the PIL image processor (what AutoProcessor picks without it). The
    # processor class itself needs torchvision for its video part, so its two steps are done as
    # Qwen2_5_VLProcessor.__call__ does them: each <|image_pad|> becomes grid.prod() / merge**2 of
    # them, then the text is tokenized; mm_token_type_ids marks the image tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    system = "You grade images. Reply in JSON."
    prompt = "a tiny astronaut hatching from an egg on the moon"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]
    text = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_inputs = image_processor(images=[image], return_tensors="pt")
    n_image_tokens = int(image_inputs["image_grid_thw"][0].prod()) // 4
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)
    input_ids = fast(expanded, return_tensors="pt")["input_ids"]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == ids["<|image_pad|>"]).to(torch.int32),
        "pixel_values": image_inputs["pixel_values"],
        "image_grid_thw": image_inputs["image_grid_thw"],
    }
    with torch.no_grad():
        pixel_values = inputs["pixel_values"]
        grid = inputs["image_grid_thw"]
        feats = model.model.get_image_features(pixel_values, grid).pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        out = model(**inputs)
        logits = out.logits[0]
        pos, deltas = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=grid
        )
        extra = [fast.convert_tokens_to_ids(t) for t in fast.tokenize('{"acc')][:3]
        ids2 = torch.cat([inputs["input_ids"], torch.tensor([extra])], dim=1)
        inputs2 = dict(inputs)
        inputs2["input_ids"] = ids2
        inputs2["attention_mask"] = torch.ones_like(ids2)
        inputs2["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros(1, len(extra), dtype=inputs["mm_token_type_ids"].dtype)], dim=1
        )
        logits2 = model(**inputs2).logits[0]
    tensors = {
        "pixel_values": pixel_values.float().contiguous(),
        "image_grid_thw": grid.to(torch.int64).contiguous(),
        "vision_features": feats.float().contiguous(),
        "input_ids": inputs["input_ids"][0].to(torch.int64).contiguous(),
        "position_ids": pos[:, 0, :].to(torch.int64).contiguous(),
        "logits": logits.float().contiguous(),
        "logits_extended_tail": logits2[-len(extra):].float().contiguous(),
    }
    save_file(tensors, os.path.join(REF, "reference.safetensors"))
    with open(os.path.join(REF, "reference.json"), "w") as f:
        json.dump(
            {
                "system": system,
                "prompt": prompt,
                "text": text,
                "extra_tokens": extra,
                "rope_delta": int(deltas[0, 0]),
                "resized_hw": [int(grid[0, 1]) * 14, int(grid[0, 2]) * 14],
            },
            f,
            indent=2,
        )
    print("vocab", vocab, "ids", ids)
    print("seq", inputs["input_ids"].shape, "grid", grid.tolist(), "feats", tuple(feats.shape))
    for root, _, files in os.walk(MODEL):
        for name in files:
            print(name, os.path.getsize(os.path.join(root, name)))


if __name__ == "__main__":
    main()
