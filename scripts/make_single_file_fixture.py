#!/usr/bin/env python3
"""Build the single-file checkpoint fixtures: tiny-b (SD-1.x) and tiny-sd2 (SD-2.x) written with LDM key names.

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_single_file_fixture.py

It (re)writes, deterministically (byte-identical on rerun):

    tests/fixtures/single/tiny-b.safetensors   tiny-b's UNet, VAE and text encoder in one file, as
                                               the original Stable Diffusion code saves them
                                               (model.diffusion_model.*, first_stage_model.*,
                                               cond_stage_model.transformer.*), float32
    tests/fixtures/single/tiny-sd2.safetensors tiny-sd2 as SD-2.x files are: the text encoder in
                                               OpenCLIP's names (cond_stage_model.model.*, fused
                                               in_proj, one extra resblock, text_projection,
                                               logit_scale), float32

The diffusers -> LDM key mapping below is the inverse of diffusers' single-file conversion
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`). It
is checked by loading the written file back with diffusers'
`StableDiffusionPipeline.from_single_file(file, config=tiny-b)` and asserting that every
parameter of the three networks equals the folder's exactly. Pinned versions:
scripts/requirements-fixtures.txt (asserted, as in make_fixtures.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import diffusers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
# tiny-b as an SD-1.x file (CLIP under cond_stage_model.transformer.), tiny-sd2 as an SD-2.x file
# (OpenCLIP under cond_stage_model.model.), tiny-xl as an SDXL file (CLIP under
# conditioner.embedders.0.transformer., OpenCLIP under conditioner.embedders.1.model.).
MODELS = ["tiny-b", "tiny-sd2", "tiny-xl"]

RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
          ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]


def resnet(rest: str) -> str:
    for ours, ldm in RESNET:
        if rest.startswith(ours):
            return ldm + rest[len(ours):]
    return rest


def split_index(rest: str) -> tuple[int, str]:
    i, tail = rest.split(".", 1)
    return int(i), tail


def unet_key(k: str, cfg: dict) -> str:
    n = len(cfg["down_block_types"])
    lpb = cfg["layers_per_block"]
    layers = lpb if isinstance(lpb, list) else [lpb] * n
    for ours, ldm in [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                      ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
                      ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]:
        if k.startswith(ours):
            return ldm + k[len(ours):]
    if k.startswith("down_blocks."):
        b, rest = split_index(k[len("down_blocks."):])
        base = 1 + sum(layers[i] + 1 for i in range(b))
        if rest.startswith("resnets."):
            j, r = split_index(rest[len("resnets."):])
            return f"input_blocks.{base + j}.0.{resnet(r)}"
        if rest.startswith("attentions."):
            j, r = split_index(rest[len("attentions."):])
            return f"input_blocks.{base + j}.1.{r}"
        if rest.startswith("downsamplers.0.conv."):
            return f"input_blocks.{base + layers[b]}.0.op.{rest[len('downsamplers.0.conv.'):]}"
    if k.startswith("mid_block."):
        rest = k[len("mid_block."):]
        if rest.startswith("resnets."):
            j, r = split_index(rest[len("resnets."):])
            return f"middle_block.{2 * j}.{resnet(r)}"
        if rest.startswith("attentions.0."):
            return f"middle_block.1.{rest[len('attentions.0.'):]}"
    if k.startswith("up_blocks."):
        b, rest = split_index(k[len("up_blocks."):])
        up = [layers[n - 1 - i] + 1 for i in range(n)]
        base = sum(up[:b])
        if rest.startswith("resnets."):
            j, r = split_index(rest[len("resnets."):])
            return f"output_blocks.{base + j}.0.{resnet(r)}"
        if rest.startswith("attentions."):
            j, r = split_index(rest[len("attentions."):])
            return f"output_blocks.{base + j}.1.{r}"
        if rest.startswith("upsamplers.0.conv."):
            slot = 2 if cfg["up_block_types"][b] == "CrossAttnUpBlock2D" else 1
            return f"output_blocks.{base + up[b] - 1}.{slot}.conv.{rest[len('upsamplers.0.conv.'):]}"
    raise KeyError(f"UNet key {k} has no LDM name")


def vae_key(k: str, cfg: dict) -> str:
    n = len(cfg["block_out_channels"])
    side, rest = k.split(".", 1)
    if side in ("quant_conv", "post_quant_conv"):
        return k
    sc = lambda r: r.replace("conv_shortcut.", "nin_shortcut.")  # noqa: E731
    if rest.startswith("conv_norm_out."):
        out = "norm_out." + rest[len("conv_norm_out."):]
    elif rest.startswith(("conv_in.", "conv_out.")):
        out = rest
    elif rest.startswith("mid_block.resnets."):
        j, r = split_index(rest[len("mid_block.resnets."):])
        out = f"mid.block_{j + 1}.{sc(r)}"
    elif rest.startswith("mid_block.attentions.0."):
        layer, tail = rest[len("mid_block.attentions.0."):].rsplit(".", 1)
        out = "mid.attn_1." + {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                               "to_out.0": "proj_out",
                               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}[layer] + "." + tail
    elif rest.startswith("down_blocks."):
        b, r = split_index(rest[len("down_blocks."):])
        if r.startswith("resnets."):
            j, rr = split_index(r[len("resnets."):])
            out = f"down.{b}.block.{j}.{sc(rr)}"
        else:
            out = f"down.{b}.downsample.conv.{r[len('downsamplers.0.conv.'):]}"
    elif rest.startswith("up_blocks."):
        b, r = split_index(rest[len("up_blocks."):])
        level = n - 1 - b
        if r.startswith("resnets."):
            j, rr = split_index(r[len("resnets."):])
            out = f"up.{level}.block.{j}.{sc(rr)}"
        else:
            out = f"up.{level}.upsample.conv.{r[len('upsamplers.0.conv.'):]}"
    else:
        raise KeyError(f"VAE key {k} has no LDM name")
    return f"{side}.{out}"


OPEN_CLIP_PARTS = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]


def open_clip_text(text: dict, tcfg: dict, seed: int, xl: bool = False) -> dict:
    """transformers CLIPTextModel keys -> SD-2's OpenCLIP keys (after `cond_stage_model.model.`).

    The inverse of diffusers' `convert_open_clip_checkpoint`: q/k/v fused into `in_proj_*`, plus
    what SD-2 files carry and the conversion drops: one more resblock than the text encoder uses
    (SD-2 conditions on the penultimate layer), `text_projection` and `logit_scale` (random here).
    """
    out = {
        "token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": text["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": text["text_model.final_layer_norm.weight"],
        "ln_final.bias": text["text_model.final_layer_norm.bias"],
    }
    n, d = tcfg["num_hidden_layers"], tcfg["hidden_size"]
    for i in range(n):
        pre = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [text[f"{pre}self_attn.{p}_proj.{kind}"] for p in "qkv"], 0)
        for k, v in text.items():
            if not k.startswith(pre) or ".self_attn." in k and "out_proj" not in k:
                continue
            rest = k[len(pre):]
            for ours, ldm in OPEN_CLIP_PARTS:
                if rest.startswith(ours):
                    out[f"transformer.resblocks.{i}.{ldm}{rest[len(ours):]}"] = v
                    break
            else:
                raise KeyError(k)
    out["logit_scale"] = torch.tensor(4.6052)
    if xl:
        # SDXL's second encoder: every layer is used (the pooled output needs the last one), and
        # the projection is the model's own, stored as (d, projection_dim) = W.T.
        out["text_projection"] = text["text_projection.weight"].T.contiguous()
        assert len(out) == 4 + 12 * n + 2, len(out)
        return out
    g = torch.Generator().manual_seed(seed)
    extra = {k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn(v.shape, generator=g)
             for k, v in out.items() if k.startswith(f"transformer.resblocks.{n - 1}.")}
    out.update(extra)
    out["text_projection"] = torch.randn(d, tcfg["projection_dim"], generator=g)
    assert len(out) == 4 + 12 * (n + 1) + 2, len(out)
    return out


def write_single(name: str) -> None:
    model = FIX / name
    out_path = FIX / "single" / f"{name}.safetensors"
    unet = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(model / "vae" / "diffusion_pytorch_model.safetensors")
    # tiny-b's text encoder file has the keys without `text_model.` (older transformers); SD-1.x
    # single files carry them with it.
    text = {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in load_file(model / "text_encoder" / "model.safetensors").items()}
    xl = (model / "text_encoder_2").is_dir()
    text_2 = load_file(model / "text_encoder_2" / "model.safetensors") if xl else {}
    ucfg = json.loads((model / "unet" / "config.json").read_text())
    vcfg = json.loads((model / "vae" / "config.json").read_text())
    tcfg = json.loads((model / "text_encoder" / "config.json").read_text())
    open_clip = tcfg["hidden_act"] == "gelu" and tcfg["eos_token_id"] == 2  # SD-2's text config

    out: dict[str, torch.Tensor] = {}
    for k, v in unet.items():
        out["model.diffusion_model." + unet_key(k, ucfg)] = v.contiguous()
    for k, v in vae.items():
        ldm = vae_key(k, vcfg)
        if ".mid.attn_1." in ldm and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + ldm] = v.contiguous()
    if xl:
        for k, v in text.items():
            out["conditioner.embedders.0.transformer." + k] = v.contiguous()
        tcfg2 = json.loads((model / "text_encoder_2" / "config.json").read_text())
        oc = open_clip_text(text_2, tcfg2, seed=12, xl=True)
        for k, v in oc.items():
            out["conditioner.embedders.1.model." + k] = v.contiguous()
        assert len(out) == len(unet) + len(vae) + len(text) + len(oc), "two keys mapped to one LDM name"
    elif open_clip:
        oc = open_clip_text(text, tcfg, seed=11)
        for k, v in oc.items():
            out["cond_stage_model.model." + k] = v.contiguous()
        assert len(out) == len(unet) + len(vae) + len(oc), "two keys mapped to one LDM name"
    else:
        for k, v in text.items():
            out["cond_stage_model.transformer." + k] = v.contiguous()
        # The buffer SD-1.x releases carry (transformers < 4.31 saved it).
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
            torch.arange(tcfg["max_position_embeddings"])[None]
        assert len(out) == len(unet) + len(vae) + len(text) + 1, "two keys mapped to one LDM name"

    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_sorted(out, out_path, {"format": "pt", "generator": "scripts/make_single_file_fixture.py",
                                            "source": f"tests/fixtures/{name}", "diffusers": diffusers.__version__})

    # Independent check: diffusers' own single-file loader gives back the folder's weights.
    if xl:
        pipe = StableDiffusionXLPipeline.from_single_file(str(out_path), config=str(model), torch_dtype=torch.float32,
                                                          local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_single_file(str(out_path), config=str(model), safety_checker=None,
                                                        torch_dtype=torch.float32, local_files_only=True)
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}

    def modern(k: str) -> str:  # tiny-b's VAE file has the legacy attention names
        for old, new in legacy.items():
            k = k.replace(old, new)
        return k

    vae_modern = {modern(k): v for k, v in vae.items()}
    nets = [("unet", unet, pipe.unet), ("vae", vae_modern, pipe.vae), ("text_encoder", text, pipe.text_encoder)]
    if xl:
        nets.append(("text_encoder_2", text_2, pipe.text_encoder_2))
    for net_name, ref, net in nets:
        # transformers 5's CLIPTextModel.state_dict() names keys without `text_model.`.
        got = {k.removeprefix("text_model."): v for k, v in net.state_dict().items()}
        ref = {k.removeprefix("text_model."): v for k, v in ref.items()}
        keys = set(ref) - {"embeddings.position_ids"}
        gkeys = set(got) - {"embeddings.position_ids"}
        assert keys == gkeys, (net_name, sorted(keys ^ gkeys)[:10])
        for k in keys:
            assert torch.equal(got[k], ref[k].reshape(got[k].shape)), (net_name, k)
        print(f"{name} {net_name}: {len(keys)} tensors equal after diffusers' from_single_file")
    print(f"wrote {out_path.relative_to(ROOT)} ({out_path.stat().st_size} bytes, {len(out)} keys)")


def main() -> None:
    check_versions()
    torch.manual_seed(0)
    for name in MODELS:
        write_single(name)


if __name__ == "__main__":
    main()
