#!/usr/bin/env python3
"""Builds the tiny random-weight Flux.1 model (both weight layouts) and its reference outputs.

Run by hand (never in CI) from the crate root with the reference venv:

    /work/venv/bin/python tools/reference/make_flux_fixtures.py

Writes
  tests/fixtures/tiny-flux/      a tiny FLUX.1-dev-architecture FluxPipeline in diffusers layout:
                                 model_index.json, scheduler/ (FLUX.1-dev's real config),
                                 transformer/ (sharded, with its index), vae/, text_encoder/
                                 (CLIP), tokenizer/ (vocab.json + merges.txt), text_encoder_2/
                                 (T5 encoder, sharded), tokenizer_2/ (tokenizer.json). Weights
                                 are stored in bfloat16, as the real repo stores them.
  tests/fixtures/tiny-flux-bfl/  the same transformer and VAE in Black Forest Labs' single-file
                                 naming: flux1-dev.safetensors and ae.safetensors.
  tests/fixtures/flux/           reference outputs from diffusers/transformers (CPU):
    tokens.json                  prompt -> CLIP ids and T5 ids (max_sequence_length 16 and 6)
    reference.safetensors        CLIP pooled output, T5 hidden states, one transformer forward
                                 (inputs and output), one VAE decode (input and output)
    schedules.json               sigmas/timesteps of FluxPipeline's schedule for several image
                                 sizes and step counts (dev and schnell scheduler configs)
    pipeline.json                the settings of each full pipeline run
    image_<name>_<i>.png         full pipeline images (output_type="pil")
"""

import json
import os
import shutil

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-flux")
BFL = os.path.join(ROOT, "tests", "fixtures", "tiny-flux-bfl")
REF = os.path.join(ROOT, "tests", "fixtures", "flux")
SD15_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tiny-sd15", "tokenizer")

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json, verbatim.
DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json, verbatim.
SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

T5_CORPUS = """
a photo of a cat sitting on a red chair in the sun highly detailed
an astronaut riding a horse on the moon digital art trending
a beautiful landscape with mountains and a lake at sunset oil painting
portrait of a woman with long hair studio lighting sharp focus
the city at night neon lights rain cinematic photorealistic
a tiny astronaut hatching from an egg on the moon
""".strip().splitlines()

PROMPTS = [
    "a photo of a cat",
    "",
    "An astronaut riding a HORSE on the moon!!",
    "a tiny astronaut hatching from an egg on the moon, highly detailed, cinematic lighting",
]


def bf16(module):
    """Rounds a module's weights to bfloat16 (kept in float32) so the stored weights are exact."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return module


def save_bf16(module, folder, max_shard_size=None):
    module.to(torch.bfloat16)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    module.save_pretrained(folder, **kwargs)
    module.to(torch.float32)


def make_t5_tokenizer(folder):
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=120,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
    )
    tok.train_from_iterator(T5_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )
    fast.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder), tok.get_vocab_size()


class Tracked(dict):
    """A dict that records which keys were read (to check a conversion uses every tensor)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)


def to_bfl_transformer(sd, n_double, n_single):
    """diffusers FluxTransformer2DModel state dict -> BFL flux1-dev.safetensors naming."""
    sd = Tracked(sd)
    out = {}

    def mlp(dst, src):
        out[f"{dst}.in_layer.weight"] = sd[f"{src}.linear_1.weight"]
        out[f"{dst}.in_layer.bias"] = sd[f"{src}.linear_1.bias"]
        out[f"{dst}.out_layer.weight"] = sd[f"{src}.linear_2.weight"]
        out[f"{dst}.out_layer.bias"] = sd[f"{src}.linear_2.bias"]

    mlp("time_in", "time_text_embed.timestep_embedder")
    mlp("vector_in", "time_text_embed.text_embedder")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        mlp("guidance_in", "time_text_embed.guidance_embedder")
    for dst, src in [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")]:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        out[f"{dst}.bias"] = sd[f"{src}.bias"]
    # AdaLayerNormContinuous chunks (scale, shift); BFL's final layer chunks (shift, scale).
    for leaf in ["weight", "bias"]:
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale], dim=0)
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for leaf in ["weight", "bias"]:
            out[f"{d}.img_mod.lin.{leaf}"] = sd[f"{s}.norm1.linear.{leaf}"]
            out[f"{d}.txt_mod.lin.{leaf}"] = sd[f"{s}.norm1_context.linear.{leaf}"]
            out[f"{d}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{s}.attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{d}.txt_attn.qkv.{leaf}"] = torch.cat(
                [sd[f"{s}.attn.add_{x}_proj.{leaf}"] for x in "qkv"]
            )
            out[f"{d}.img_attn.proj.{leaf}"] = sd[f"{s}.attn.to_out.0.{leaf}"]
            out[f"{d}.txt_attn.proj.{leaf}"] = sd[f"{s}.attn.to_add_out.{leaf}"]
            out[f"{d}.img_mlp.0.{leaf}"] = sd[f"{s}.ff.net.0.proj.{leaf}"]
            out[f"{d}.img_mlp.2.{leaf}"] = sd[f"{s}.ff.net.2.{leaf}"]
            out[f"{d}.txt_mlp.0.{leaf}"] = sd[f"{s}.ff_context.net.0.proj.{leaf}"]
            out[f"{d}.txt_mlp.2.{leaf}"] = sd[f"{s}.ff_context.net.2.{leaf}"]
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for leaf in ["weight", "bias"]:
            out[f"{d}.modulation.lin.{leaf}"] = sd[f"{s}.norm.linear.{leaf}"]
            out[f"{d}.linear1.{leaf}"] = torch.cat(
                [sd[f"{s}.attn.to_{x}.{leaf}"] for x in "qkv"] + [sd[f"{s}.proj_mlp.{leaf}"]]
            )
            out[f"{d}.linear2.{leaf}"] = sd[f"{s}.proj_out.{leaf}"]
        out[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    assert sd.used == set(sd), sorted(set(sd) - sd.used)[:5]
    return {k: v.contiguous() for k, v in out.items()}


def to_bfl_vae(sd, n_levels):
    """diffusers AutoencoderKL state dict -> BFL ae.safetensors naming (decoder and encoder)."""
    out = {}

    def resnet(dst, src):
        for name in ["norm1", "conv1", "norm2", "conv2"]:
            for leaf in ["weight", "bias"]:
                out[f"{dst}.{name}.{leaf}"] = sd[f"{src}.{name}.{leaf}"]
        if f"{src}.conv_shortcut.weight" in sd:
            for leaf in ["weight", "bias"]:
                out[f"{dst}.nin_shortcut.{leaf}"] = sd[f"{src}.conv_shortcut.{leaf}"]

    def attn(dst, src):
        for leaf in ["weight", "bias"]:
            out[f"{dst}.norm.{leaf}"] = sd[f"{src}.group_norm.{leaf}"]
        for d, s in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
            w = sd[f"{src}.{s}.weight"]
            out[f"{dst}.{d}.weight"] = w.reshape(*w.shape, 1, 1)
            out[f"{dst}.{d}.bias"] = sd[f"{src}.{s}.bias"]

    for part in ["encoder", "decoder"]:
        for leaf in ["weight", "bias"]:
            out[f"{part}.conv_in.{leaf}"] = sd[f"{part}.conv_in.{leaf}"]
            out[f"{part}.conv_out.{leaf}"] = sd[f"{part}.conv_out.{leaf}"]
            out[f"{part}.norm_out.{leaf}"] = sd[f"{part}.conv_norm_out.{leaf}"]
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    for i in range(n_levels):
        j = 0
        while f"encoder.down_blocks.{i}.resnets.{j}.conv1.weight" in sd:
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
            j += 1
        if f"encoder.down_blocks.{i}.downsamplers.0.conv.weight" in sd:
            for leaf in ["weight", "bias"]:
                out[f"encoder.down.{i}.downsample.conv.{leaf}"] = sd[
                    f"encoder.down_blocks.{i}.downsamplers.0.conv.{leaf}"
                ]
        level = n_levels - 1 - i
        j = 0
        while f"decoder.up_blocks.{i}.resnets.{j}.conv1.weight" in sd:
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
            j += 1
        if f"decoder.up_blocks.{i}.upsamplers.0.conv.weight" in sd:
            for leaf in ["weight", "bias"]:
                out[f"decoder.up.{level}.upsample.conv.{leaf}"] = sd[
                    f"decoder.up_blocks.{i}.upsamplers.0.conv.{leaf}"
                ]
    assert len(out) == len(sd), (len(out), len(sd), sorted(set(sd) - set(out))[:5])
    return {k: v.contiguous() for k, v in out.items()}


def main():
    torch.manual_seed(0)
    for d in [MODEL, BFL, REF]:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    # --- components -------------------------------------------------------------------------
    transformer = bf16(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()
    )
    with torch.no_grad():  # default init leaves some projections at zero; make every path count
        for name, p in transformer.named_parameters():
            if p.dim() == 1 and "norm" not in name:
                p.copy_((torch.randn_like(p) * 0.05).to(torch.bfloat16).float())
            elif p.dim() == 1:
                p.copy_((1 + torch.randn_like(p) * 0.1).to(torch.bfloat16).float())
            else:
                p.copy_((torch.randn_like(p) / p.shape[1] ** 0.5).to(torch.bfloat16).float())
    vae = bf16(
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            block_out_channels=[32, 32],
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
    )
    clip = bf16(
        CLIPTextModel(
            CLIPTextConfig(
                vocab_size=707,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=705,
                eos_token_id=706,
                pad_token_id=1,
                projection_dim=32,
            )
        ).eval()
    )
    shutil.copytree(SD15_TOKENIZER, os.path.join(MODEL, "tokenizer"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer"))
    t5_tok, t5_vocab = make_t5_tokenizer(os.path.join(MODEL, "tokenizer_2"))
    t5 = bf16(
        T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu",
                is_gated_act=True,
                dense_act_fn="gelu_new",
                layer_norm_epsilon=1e-6,
                tie_word_embeddings=False,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).eval()
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(DEV_SCHEDULER)

    save_bf16(transformer, os.path.join(MODEL, "transformer"), max_shard_size="150KB")
    save_bf16(vae, os.path.join(MODEL, "vae"))
    save_bf16(clip, os.path.join(MODEL, "text_encoder"))
    save_bf16(t5, os.path.join(MODEL, "text_encoder_2"), max_shard_size="40KB")
    scheduler.save_pretrained(os.path.join(MODEL, "scheduler"))
    with open(os.path.join(MODEL, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(DEV_SCHEDULER, f, indent=2)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0"}
    for name in ["scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"]:
        component = getattr(pipe, name)
        lib = "diffusers" if type(component).__module__.startswith("diffusers") else "transformers"
        index[name] = [lib, type(component).__name__]
    with open(os.path.join(MODEL, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)

    # BFL single-file layout of the same transformer and VAE (bf16, as BFL ships them).
    tsd = {k: v.to(torch.bfloat16) for k, v in transformer.state_dict().items()}
    save_file(to_bfl_transformer(tsd, 2, 2), os.path.join(BFL, "flux1-dev.safetensors"))
    vsd = {k: v.to(torch.bfloat16) for k, v in vae.state_dict().items()}
    save_file(to_bfl_vae(vsd, 2), os.path.join(BFL, "ae.safetensors"))

    # --- tokens and encoders ------------------------------------------------------------------
    tokens = []
    for p in PROMPTS:
        clip_ids = clip_tok(p, padding="max_length", max_length=77, truncation=True).input_ids
        t5_16 = t5_tok(p, padding="max_length", max_length=16, truncation=True).input_ids
        t5_6 = t5_tok(p, padding="max_length", max_length=6, truncation=True).input_ids
        tokens.append({"prompt": p, "clip": clip_ids, "t5_16": t5_16, "t5_6": t5_6})
    with open(os.path.join(REF, "tokens.json"), "w") as f:
        json.dump(tokens, f, indent=1)

    ref = {}
    with torch.no_grad():
        prompt = PROMPTS[3]
        clip_ids = torch.tensor([tokens[3]["clip"]])
        ref["clip_pooled"] = clip(clip_ids).pooler_output
        t5_ids = torch.tensor([tokens[3]["t5_16"]])
        ref["t5_hidden"] = t5(t5_ids)[0]

        g = torch.Generator().manual_seed(1)
        hs = torch.randn(2, 64, 64, generator=g)
        enc = torch.randn(2, 7, 32, generator=g)
        pooled = torch.randn(2, 32, generator=g)
        t = torch.tensor([0.75, 0.3])
        guidance = torch.tensor([3.5, 3.5])
        txt_ids = torch.zeros(7, 3)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
        out = transformer(
            hidden_states=hs,
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            timestep=t,
            guidance=guidance,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        ref.update(
            {
                "tr_hidden_states": hs,
                "tr_encoder_hidden_states": enc,
                "tr_pooled": pooled,
                "tr_timestep": t,
                "tr_guidance": guidance,
                "tr_img_ids": img_ids,
                "tr_out": out,
            }
        )
        z = torch.randn(1, 16, 8, 8, generator=g)
        ref["vae_latents"] = z
        ref["vae_decoded"] = vae.decode(z, return_dict=False)[0]
        print("pipeline prompt", prompt)
    save_file({k: v.contiguous().float() for k, v in ref.items()}, os.path.join(REF, "reference.safetensors"))

    # --- schedules ----------------------------------------------------------------------------
    schedules = []
    for cfg_name, cfg in [("dev", DEV_SCHEDULER), ("schnell", SCHNELL_SCHEDULER)]:
        for (h, w) in [(256, 256), (512, 768), (1024, 1024), (1360, 768)]:
            for steps in [1, 4, 28, 50]:
                sch = FlowMatchEulerDiscreteScheduler.from_config(cfg)
                seq = (h // 16) * (w // 16)
                mu = calculate_shift(
                    seq, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
                )
                sigmas = np.linspace(1.0, 1 / steps, steps)
                sch.set_timesteps(steps, sigmas=sigmas, mu=mu)
                schedules.append(
                    {
                        "config": cfg_name,
                        "height": h,
                        "width": w,
                        "steps": steps,
                        "mu": mu,
                        "timesteps": sch.timesteps.tolist(),
                        "sigmas": sch.sigmas.tolist(),
                    }
                )
    with open(os.path.join(REF, "schedules.json"), "w") as f:
        json.dump({"dev": DEV_SCHEDULER, "schnell": SCHNELL_SCHEDULER, "cases": schedules}, f, indent=1)

    # --- full pipeline --------------------------------------------------------------------------
    runs = [
        {"name": "fp32", "seeds": [0, 7], "height": 32, "width": 32, "steps": 3, "guidance": 3.5, "msl": 16},
        {"name": "wide", "seeds": [3], "height": 16, "width": 40, "steps": 2, "guidance": 5.0, "msl": 6},
    ]
    for run in runs:
        gens = [torch.Generator("cpu").manual_seed(s) for s in run["seeds"]]
        images = pipe(
            prompt=PROMPTS[3],
            height=run["height"],
            width=run["width"],
            num_inference_steps=run["steps"],
            guidance_scale=run["guidance"],
            max_sequence_length=run["msl"],
            generator=gens,
            num_images_per_prompt=len(gens),
            output_type="pil",
        ).images
        for i, img in enumerate(images):
            img.save(os.path.join(REF, f"image_{run['name']}_{i}.png"))
        run["prompt"] = PROMPTS[3]
    # bf16: the same fp32 run in bfloat16 (diffusers on CPU), for the stated bf16 tolerance.
    pipe.to(torch.bfloat16)
    gens = [torch.Generator("cpu").manual_seed(s) for s in runs[0]["seeds"]]
    images = pipe(
        prompt=PROMPTS[3],
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=3.5,
        max_sequence_length=16,
        generator=gens,
        num_images_per_prompt=2,
        output_type="pil",
    ).images
    for i, img in enumerate(images):
        img.save(os.path.join(REF, f"image_bf16_{i}.png"))
    runs.append(dict(runs[0], name="bf16"))
    with open(os.path.join(REF, "pipeline.json"), "w") as f:
        json.dump(runs, f, indent=1)
    total = 0
    for d in [MODEL, BFL, REF]:
        for root, _, files in os.walk(d):
            total += sum(os.path.getsize(os.path.join(root, x)) for x in files)
    print(f"fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
