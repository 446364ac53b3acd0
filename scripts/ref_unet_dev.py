#!/usr/bin/env python3
"""Extra UNet references for tests/unet.rs (the `--ignored` tests), beyond the committed fixtures.

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/ref_unet_dev.py [OUT_DIR]

OUT_DIR (default /tmp/unet_dev) receives:
  exotic/unet/           a tiny UNet with non-default config values this crate supports
                         (downsample_padding 0, freq_shift 1, flip_sin_to_cos false,
                         center_input_sample, mid_block_scale_factor 2, time_embedding_dim 40,
                         conv_in_kernel 1, conv_out_kernel 5, per-level layers_per_block, 5 heads
                         on 24 channels: dim_head 4, transformer inner width 20)
  nomid/unet/            a tiny UNet with mid_block_type null
  refs.safetensors       inputs/outputs: exotic.*, nomid.*, odd.* (tiny-b weights from
                         tests/fixtures/tiny-b/unet on a 9x7 latent with a 0-dim float timestep,
                         i.e. diffusers' forwarded upsample_size path)
CPU, fp32, deterministic.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/unet_dev")


def reinit_(model, seed):
    """Every weight random (diffusers zero-inits nothing in the UNet, but be explicit)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(r * 0.05)
            elif p.ndim == 1:  # norm weights
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


EXOTIC = dict(
    sample_size=8, in_channels=3, out_channels=5, center_input_sample=True, flip_sin_to_cos=False,
    freq_shift=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16, 24), layers_per_block=(1, 2, 1), downsample_padding=0,
    mid_block_scale_factor=2.0, norm_num_groups=4, norm_eps=1e-6, cross_attention_dim=12,
    attention_head_dim=(2, 4, 5), time_embedding_dim=40, conv_in_kernel=1, conv_out_kernel=5,
    transformer_layers_per_block=(2, 1, 1), use_linear_projection=False,
)
NOMID = dict(
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
    cross_attention_dim=12, attention_head_dim=2, use_linear_projection=True,
)


def run(name, unet, sample, t, ehs, refs):
    with torch.no_grad():
        out = unet(sample, t, ehs).sample
    refs.update({f"{name}.sample": sample, f"{name}.timestep": t,
                 f"{name}.encoder_hidden_states": ehs, f"{name}.out": out})


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    refs = {}
    for i, (name, cfg, hw) in enumerate([("exotic", EXOTIC, (11, 6)), ("nomid", NOMID, (8, 6))]):
        unet = UNet2DConditionModel(**cfg).eval()
        reinit_(unet, 100 + i)
        unet.save_pretrained(OUT / name / "unet", safe_serialization=True)
        unet = UNet2DConditionModel.from_pretrained(OUT / name / "unet").eval()
        c_in = cfg.get("in_channels", 4)
        sample = torch.randn(2, c_in, *hw)
        ehs = torch.randn(2, 77, cfg["cross_attention_dim"])
        run(name, unet, sample, torch.tensor([999.0, 3.5]), ehs, refs)
    unet = UNet2DConditionModel.from_pretrained(ROOT / "tests/fixtures/tiny-b/unet").eval()
    run("odd", unet, torch.randn(2, 4, 9, 7), torch.tensor(500.5), torch.randn(2, 77, 24), refs)
    save_file({k: v.contiguous() for k, v in refs.items()}, str(OUT / "refs.safetensors"))
    print("wrote", OUT, sorted(refs))


if __name__ == "__main__":
    main()
