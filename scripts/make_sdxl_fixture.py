#!/usr/bin/env python3
"""Build the tiny random SDXL fixture and its reference tensors (`StableDiffusionXLPipeline`).

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_sdxl_fixture.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/tiny-xl/                diffusers SDXL folder, fp32: two text encoders
                                           (CLIPTextModel + CLIPTextModelWithProjection), two
                                           1000-token CLIP tokenizers (the second pads with "!"),
                                           a UNet with addition_embed_type "text_time", a first
                                           level without attention and a deeper transformer
                                           stack below, a VAE with SDXL's scaling factor and
                                           force_upcast, and a DDIM scheduler
    tests/fixtures/ti-xl/                  an SDXL textual-inversion embedding (2 vectors, random) in
                                           the two forms users have: A1111 / ComfyUI's one file
                                           {"clip_l", "clip_g"} (sks-xl.safetensors) and diffusers'
                                           two files (learned_embeds.safetensors for encoder 1,
                                           learned_embeds_2.safetensors for encoder 2)
    tests/fixtures/tiny-xl.ref.safetensors tokenizer ids, prompt embeddings (penultimate hidden
                                           states of both encoders, concatenated) and pooled
                                           text_embeds, one UNet call with added_cond_kwargs,
                                           and two pipeline runs: negative prompt None
                                           (force_zeros_for_empty_prompt: zeros as φ) and a
                                           negative prompt, non-square, two images per prompt;
                                           and a run with the embedding loaded into both encoders
                                           by `load_textual_inversion` (ti.*)

Not the shapes of the real SDXL (tiny, random), but every code path of it. Pinned versions:
scripts/requirements-fixtures.txt (asserted, as in make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
)

from make_fixtures import (  # noqa: E402
    SCHED_COMMON, check_versions, grad_coverage, reinit_, save_safetensors_sorted, stats, write_tokenizer_b,
)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "tiny-xl"
REF = FIX / "tiny-xl.ref.safetensors"
TI = FIX / "ti-xl"
TI_TOKEN = "<sks-xl>"
TI_PROMPT = "a photo of <sks-xl> on a mossy rock"
SEED = 4

# SDXL's two text configs carry the legacy ids 0/2/1 of the OpenAI / LAION configs; with
# eos_token_id 2, transformers pools at argmax(input_ids) (the eos, the largest id here too).
TEXT_1 = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32)
TEXT_2 = dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=40)
TIME_DIM = 8
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
    norm_num_groups=8, cross_attention_dim=32 + 48,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=40 + 6 * TIME_DIM,
)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
           sample_size=16, scaling_factor=0.13025, force_upcast=True)
SCHED = dict(SCHED_COMMON, set_alpha_to_one=False, timestep_spacing="leading")

PROMPT = "a photo of a sks backpack on a mossy rock, morning light"
GENS = {
    # negative prompt None: SDXL's force_zeros_for_empty_prompt makes φ zeros (and pooled φ too)
    "gen": dict(prompt=PROMPT, negative_prompt=None, seed=77, steps=5, guidance=5.0, height=16, width=24,
                num_images=1),
    # a negative prompt, encoded by both encoders; two images per prompt, portrait
    "gen_neg": dict(prompt=PROMPT, negative_prompt="blurry, low quality", seed=78, steps=4, guidance=6.0,
                    height=24, width=16, num_images=2),
}


def write_tokenizers(dst: Path) -> None:
    """tokenizer/: SDXL's first tokenizer pads with <|endoftext|>; tokenizer_2/: with "!"."""
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        d = dst / sub
        if d.exists():
            shutil.rmtree(d)
        write_tokenizer_b(d)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            p = d / name
            cfg = json.loads(p.read_text(encoding="utf-8"))
            cfg["pad_token"] = pad
            p.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(tmp_tok: Path):
    torch.manual_seed(SEED)
    te1 = CLIPTextModel(CLIPTextConfig(**TEXT_1)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval()
    unet = UNet2DConditionModel(**UNET).eval()
    vae = AutoencoderKL(**VAE).eval()
    base = SEED * 1000
    reinit_(te1, base + 1)
    reinit_(te2, base + 2)
    reinit_(unet, base + 3)
    reinit_(vae, base + 4, out_gain={"decoder.conv_out": 0.5})
    tok1 = CLIPTokenizer.from_pretrained(tmp_tok / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tmp_tok / "tokenizer_2")
    assert (tok1.pad_token_id, tok2.pad_token_id, tok1.eos_token_id) == (999, 0, 999), (tok1.pad_token_id,
                                                                                      tok2.pad_token_id)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=DDIMScheduler(**SCHED),
                                     force_zeros_for_empty_prompt=True)


def sanity(pipe) -> None:
    g = torch.Generator().manual_seed(5)
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([901, 33])
    ehs = torch.randn(2, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(2, 40, generator=g),
             "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24], [24.0, 16, 3, 1, 24, 16]])}
    out = unet(x, t, ehs, added_cond_kwargs=added).sample
    print("  unet out", stats(out))
    grad_coverage("tiny-xl/unet", unet, (out * torch.randn(out.shape, generator=g)).sum())
    with torch.no_grad():
        out = unet(x, t, ehs, added_cond_kwargs=added).sample
        a2 = dict(added, time_ids=added["time_ids"] + torch.tensor([8.0, 0, 0, 0, 0, 0]))
        rel = ((unet(x, t, ehs, added_cond_kwargs=a2).sample - out).norm() / out.norm()).item()
        a3 = dict(added, text_embeds=added["text_embeds"] + 0.5)
        rel_p = ((unet(x, t, ehs, added_cond_kwargs=a3).sample - out).norm() / out.norm()).item()
    print(f"  unet: relative change from original height +8: {rel:.4f}; from pooled embeds +0.5: {rel_p:.4f}")
    assert rel > 1e-3 and rel_p > 1e-3, "the added conditioning barely matters"
    for name, te in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        ids = torch.randint(0, 998, (2, 77), generator=g)
        o = te(ids, output_hidden_states=True)
        loss = (o.hidden_states[-2] * torch.randn(o.hidden_states[-2].shape, generator=g)).sum()
        if name == "te2":
            loss = loss + (o.text_embeds * torch.randn(o.text_embeds.shape, generator=g)).sum()
        # the last layer feeds only the pooled output (te2); te1's last layer is unused, as in SDXL
        skip = ("token_embedding",) if name == "te2" else ("token_embedding", "layers.2.", "final_layer_norm")
        grad_coverage(f"tiny-xl/{name}", te, loss, skip=skip)


def gen_refs(pipe, key: str, gs: dict, T: dict, M: dict) -> None:
    cap: dict = {}
    orig = pipe.prepare_latents

    def prepare_latents(*a, **k):
        lat = orig(*a, **k)
        cap["init"] = lat.clone()
        return lat

    def on_step_end(p, i, t, kw):
        cap.setdefault("timesteps", []).append(int(t))
        cap["final"] = kw["latents"].clone()
        return kw

    pipe.prepare_latents = prepare_latents
    with torch.no_grad():
        images = pipe(
            prompt=gs["prompt"], negative_prompt=gs["negative_prompt"], num_inference_steps=gs["steps"],
            guidance_scale=gs["guidance"], height=gs["height"], width=gs["width"],
            num_images_per_prompt=gs["num_images"], generator=torch.Generator("cpu").manual_seed(gs["seed"]),
            output_type="np", callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
        ).images
    pipe.prepare_latents = orig
    shape = (gs["num_images"], 4, gs["height"] // pipe.vae_scale_factor, gs["width"] // pipe.vae_scale_factor)
    assert torch.equal(cap["init"], torch.randn(shape, generator=torch.Generator("cpu").manual_seed(gs["seed"])))
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            gs["prompt"], num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=gs["negative_prompt"])
    T[f"{key}.latents_init"] = cap["init"]
    T[f"{key}.latents_final"] = cap["final"]
    T[f"{key}.timesteps"] = torch.tensor(cap["timesteps"], dtype=torch.int64)
    T[f"{key}.prompt_embeds"] = pe
    T[f"{key}.negative_prompt_embeds"] = npe
    T[f"{key}.pooled_prompt_embeds"] = pooled
    T[f"{key}.negative_pooled_prompt_embeds"] = npooled
    T[f"{key}.image_u8"] = torch.from_numpy((images * 255).round().astype("uint8"))
    im = torch.from_numpy(images)
    print(f"  {key}: timesteps {cap['timesteps']}; image mean {im.mean():.3f}, "
          f"fraction at 0/1: {((im == 0) | (im == 1)).float().mean():.3f}; negative embeds absmax "
          f"{npe.abs().max():.3f}")
    for k, v in gs.items():
        if v is not None:
            M[f"{key}.{k}"] = str(v)


def ti_refs(T: dict, M: dict) -> None:
    """An SDXL embedding, loaded as the diffusers docs show (once per encoder), and one image."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(SEED * 1000 + 11)
    clip_l, clip_g = 0.5 * torch.randn(2, 32, generator=g), 0.5 * torch.randn(2, 48, generator=g)
    if TI.exists():
        shutil.rmtree(TI)
    TI.mkdir(parents=True)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(TI / "sks-xl.safetensors"))
    save_file({TI_TOKEN: clip_l}, str(TI / "learned_embeds.safetensors"))
    save_file({TI_TOKEN: clip_g}, str(TI / "learned_embeds_2.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(OUT, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(clip_l, token=TI_TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=TI_TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    gs = dict(prompt=TI_PROMPT, negative_prompt=None, seed=79, steps=4, guidance=5.0, height=16, width=16,
              num_images=1)
    gen_refs(pipe, "ti", gs, T, M)
    with torch.no_grad():
        T["ti.input_ids_1"] = pipe.tokenizer(pipe.maybe_convert_prompt(TI_PROMPT, pipe.tokenizer), padding="max_length",
                                             max_length=77, truncation=True, return_tensors="pt").input_ids
        T["ti.input_ids_2"] = pipe.tokenizer_2(pipe.maybe_convert_prompt(TI_PROMPT, pipe.tokenizer_2),
                                               padding="max_length", max_length=77, truncation=True,
                                               return_tensors="pt").input_ids
    M["ti.token"] = TI_TOKEN
    print(f"  ti: ids_1 {T['ti.input_ids_1'][0, :12].tolist()}")


def main() -> None:
    check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tmp = FIX / ".tiny-xl-tokenizers.tmp"
    write_tokenizers(tmp)
    pipe = build(tmp)
    shutil.rmtree(tmp)
    sanity(pipe)
    if OUT.exists():
        shutil.rmtree(OUT)
    pipe.save_pretrained(OUT, safe_serialization=True)
    write_tokenizers(OUT)
    for p in sorted(OUT.rglob("*")):
        if p.is_file() and p.suffix not in (".json", ".safetensors") and p.parent.name not in ("tokenizer",
                                                                                                "tokenizer_2"):
            p.unlink()
    for p in sorted(OUT.rglob("*.json")):  # byte-stable configs
        p.write_text(json.dumps(json.loads(p.read_text()), indent=2, sort_keys=True) + "\n")

    pipe = StableDiffusionXLPipeline.from_pretrained(OUT, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.config.force_zeros_for_empty_prompt

    T: dict[str, torch.Tensor] = {}
    M = {"model": "tiny-xl", "generator": "scripts/make_sdxl_fixture.py", "torch": torch.__version__,
         "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    g = torch.Generator().manual_seed(SEED * 1000 + 7)
    with torch.no_grad():
        prompts = [PROMPT, "an oil painting of a lighthouse in a storm, dramatic sky, crashing waves " * 3]
        for i, tok in (("1", pipe.tokenizer), ("2", pipe.tokenizer_2)):
            T[f"text.input_ids_{i}"] = tok(prompts, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids.to(torch.int64)
        o1 = pipe.text_encoder(T["text.input_ids_1"], output_hidden_states=True)
        o2 = pipe.text_encoder_2(T["text.input_ids_2"], output_hidden_states=True)
        T["text.penultimate_1"] = o1.hidden_states[-2]
        T["text.penultimate_2"] = o2.hidden_states[-2]
        T["text.text_embeds_2"] = o2.text_embeds
        M["text.prompts"] = json.dumps(prompts)

        T["unet.sample"] = torch.randn(2, 4, 8, 12, generator=g)
        T["unet.timestep"] = torch.tensor([981, 17], dtype=torch.int64)
        T["unet.encoder_hidden_states"] = torch.randn(2, 77, 80, generator=g)
        T["unet.text_embeds"] = torch.randn(2, 40, generator=g)
        T["unet.time_ids"] = torch.tensor([[64.0, 96, 0, 0, 64, 96], [1024.0, 768, 16, 8, 512, 512]])
        T["unet.out"] = pipe.unet(T["unet.sample"], T["unet.timestep"], T["unet.encoder_hidden_states"],
                                  added_cond_kwargs={"text_embeds": T["unet.text_embeds"],
                                                     "time_ids": T["unet.time_ids"]}).sample
    for key, gs in GENS.items():
        gen_refs(pipe, key, gs, T, M)
    ti_refs(T, M)
    for k, v in T.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
        T[k] = v.detach().contiguous()
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {OUT.relative_to(ROOT)}/ and {REF.relative_to(ROOT)} ({len(T)} tensors)")
    for k in sorted(T):
        print(f"    {k:36s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")


if __name__ == "__main__":
    main()
