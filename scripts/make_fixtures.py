#!/usr/bin/env python3
"""Build the tiny random Stable Diffusion 1.x test fixtures and their reference tensors.

Run by hand from the repository root (CPU only, ~1 minute):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_fixtures.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/tiny-a/                 diffusers folder, fp16 weight files, real CLIP vocab
    tests/fixtures/tiny-b/                 diffusers folder, fp32 weights, 1000-token BPE,
                                           VAE mid-block attention saved with legacy key names
    tests/fixtures/tiny-a.ref.safetensors  reference inputs/outputs (see tests/fixtures/README.md)
    tests/fixtures/tiny-b.ref.safetensors
    tests/fixtures/tokenizer_cases.json    CLIPTokenizer ids for awkward strings, both tokenizers

Pinned versions: scripts/requirements-fixtures.txt (asserted below).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CLIP_TOK = FIX / "tokenizers" / "clip"
TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]

PINS = {"torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.24.0"}


def check_versions() -> None:
    got = {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    bad = {k: (got[k], v) for k, v in PINS.items() if got[k] != v}
    if bad:
        sys.exit(f"make_fixtures.py: version mismatch (got, wanted): {bad}; "
                 "see scripts/requirements-fixtures.txt")
    try:
        import ftfy  # noqa: F401
        sys.exit("make_fixtures.py: ftfy is installed; the fixtures document the no-ftfy path. "
                 "Uninstall ftfy.")
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------

SCHED_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)

SPECS = {
    "tiny-a": dict(
        seed=1,
        fp16=True,
        legacy_vae_names=False,
        text=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, pad_token_id=49407, bos_token_id=49406, eos_token_id=49407,
            projection_dim=32,
        ),
        unet=dict(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3, out_channels=3, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32,
            scaling_factor=0.18215,
        ),
        sched=dict(SCHED_COMMON, set_alpha_to_one=False, timestep_spacing="leading"),
        # reference inputs
        text_prompts=[
            "A  photo of a SKS dog, on the BEACH!!  (high-res)",
            "an oil painting of a red fox in a snowy forest, golden hour, " * 8,
        ],
        unet_hw=(16, 16),
        vae_hw=(32, 32),
        gen=dict(
            prompt="A photo of a sks dog -- in the SNOW,  high-res!",
            negative_prompt="blurry, low quality; JPEG artifacts",
            seed=1234, steps=8, guidance=7.5, height=32, width=32, num_images=1,
        ),
    ),
    "tiny-b": dict(
        seed=2,
        fp16=False,
        legacy_vae_names=True,
        text=dict(
            vocab_size=1000, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=3, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-5, pad_token_id=None, bos_token_id=998, eos_token_id=999,
            projection_dim=24,
        ),
        unet=dict(
            sample_size=12, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 1],
            use_linear_projection=True, norm_num_groups=8, cross_attention_dim=24,
            flip_sin_to_cos=True, freq_shift=0,
        ),
        vae=dict(
            in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32,
            scaling_factor=0.3,
        ),
        sched=dict(SCHED_COMMON, set_alpha_to_one=True, timestep_spacing="trailing"),
        text_prompts=[
            "Café at NIGHT:  neon lights & rain... it's wet!",
            "a watercolor of mountains, rivers and tiny houses under a pale sky " * 3,
        ],
        unet_hw=(12, 8),
        vae_hw=(48, 32),
        gen=dict(
            prompt="Café at NIGHT:  neon lights & rain... it's wet!",
            negative_prompt=None,
            seed=4321, steps=6, guidance=5.0, height=48, width=32, num_images=2,
        ),
    ),
    "tiny-sd2": dict(
        # Stable Diffusion 2.x in miniature: the OpenCLIP-H text encoder as transformers ships it
        # (gelu, the legacy bos/eos/pad ids 0/2/1 of SD-2's config, pad "!" in the tokenizer),
        # linear projections and per-block head counts in the UNet, upcast_attention, and a
        # v-prediction DDIM schedule (stabilityai/stable-diffusion-2-1's scheduler_config).
        seed=3,
        fp16=False,
        legacy_vae_names=False,
        text=dict(
            vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            projection_dim=32,
        ),
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=[2, 4, 8], use_linear_projection=True, upcast_attention=True,
            norm_num_groups=8, cross_attention_dim=48,
        ),
        vae=dict(
            in_channels=3, out_channels=3, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16,
            scaling_factor=0.18215,
        ),
        sched=dict(SCHED_COMMON, prediction_type="v_prediction", set_alpha_to_one=False,
                   timestep_spacing="leading"),
        text_prompts=[
            "a photo of a sks dog wearing a red hat, 4k",
            "a cinematic still of a lighthouse on a cliff at dusk, volumetric fog " * 3,
        ],
        unet_hw=(8, 12),
        vae_hw=(16, 24),
        gen=dict(
            prompt="a photo of a sks dog wearing a red hat, 4k",
            negative_prompt=None,
            seed=2025, steps=6, guidance=7.5, height=16, width=24, num_images=1,
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def write_tokenizer_a(dst: Path) -> None:
    """tiny-a: byte-for-byte copy of the real CLIP tokenizer files (no symlinks)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(CLIP_TOK / name, dst / name)


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_b(dst: Path) -> None:
    """tiny-b: CLIP BPE truncated to 1000 tokens (998 real entries + the 2 special tokens)."""
    vocab = json.loads((CLIP_TOK / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    kept = [tok for tok, _ in by_id[:998]]
    new_vocab = {tok: i for i, tok in enumerate(kept)}
    new_vocab["<|startoftext|>"] = 998
    new_vocab["<|endoftext|>"] = 999
    assert len(new_vocab) == 1000

    lines = (CLIP_TOK / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version"), lines[0]
    n_merges = 998 - 512
    merges = lines[1:1 + n_merges]
    assert len(merges) == n_merges and all(len(m.split(" ")) == 2 for m in merges)
    # Consistency: merge i produces vocab id 512 + i, and both of its parts are in the vocab.
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        assert a in new_vocab and b in new_vocab, m
        assert new_vocab.get(a + b) == 512 + i, (i, m)
    # the first 512 entries are the 256 byte chars and the same + "</w>"
    assert all(not kept[i].endswith("</w>") for i in range(256))
    assert all(kept[256 + i] == kept[i] + "</w>" for i in range(256))

    dst.mkdir(parents=True, exist_ok=True)
    # same layout as the real CLIP vocab.json: one JSON object, no spaces/newlines
    (dst / "vocab.json").write_text(json.dumps(new_vocab, ensure_ascii=False, separators=(",", ":")),
                                    encoding="utf-8")
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = {
        "add_prefix_space": False,
        "bos_token": _added_token("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": _added_token("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token("<|endoftext|>"),
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    stm = {k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
           for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (dst / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")


def write_tokenizer(name: str, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    if name == "tiny-a":
        write_tokenizer_a(dst)
    else:
        write_tokenizer_b(dst)


# --------------------------------------------------------------------------------------------
# Random, non-degenerate weights
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int, emb_std: float = 0.5, out_gain: dict | None = None) -> None:
    """Re-initialise every parameter so activations are O(1) and no weight is (near) zero.

    Linear/Conv: N(0, 1/fan_in) (times an optional per-name gain); biases N(0, 0.05^2);
    GroupNorm/LayerNorm weight 1 + N(0, 0.1^2), bias N(0, 0.05^2); embeddings N(0, emb_std^2).
    """
    g = torch.Generator().manual_seed(seed)
    out_gain = out_gain or {}
    modules = dict(model.named_modules())
    for pname, p in model.named_parameters():
        mod_name, _, leaf = pname.rpartition(".")
        mod = modules[mod_name]
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            val = 1.0 + 0.1 * r if leaf == "weight" else 0.05 * r
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            if leaf == "weight":
                fan_in = p[0].numel()
                val = r / fan_in ** 0.5 * out_gain.get(mod_name, 1.0)
            else:
                val = 0.05 * r
        elif isinstance(mod, torch.nn.Embedding):
            val = emb_std * r
        else:
            raise RuntimeError(f"reinit_: unhandled parameter {pname} in {type(mod).__name__}")
        p.copy_(val.to(p.dtype))


def grad_coverage(name: str, model: torch.nn.Module, loss: torch.Tensor, skip: tuple = ()) -> None:
    """Backprop a random projection of the outputs and check every parameter gets gradient."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    dead, zero_frac = [], []
    for pname, p in model.named_parameters():
        if any(s in pname for s in skip):
            continue
        if p.grad is None or p.grad.abs().sum() == 0:
            dead.append(pname)
        else:
            zero_frac.append((p.grad == 0).float().mean().item())
    model.zero_grad(set_to_none=True)
    print(f"  [{name}] params without gradient: {len(dead)}; max fraction of exactly-zero grad "
          f"entries in a param: {max(zero_frac):.4f}")
    if dead:
        raise RuntimeError(f"{name}: parameters do not influence the output: {dead[:10]}")


def stats(t: torch.Tensor) -> str:
    t = t.detach().float()
    return f"shape={tuple(t.shape)} mean={t.mean():+.4f} std={t.std():.4f} absmax={t.abs().max():.4f}"


# --------------------------------------------------------------------------------------------
# Build + save
# --------------------------------------------------------------------------------------------

def build_models(name: str, spec: dict, pad_id: int):
    torch.manual_seed(spec["seed"])
    tcfg = dict(spec["text"])
    if tcfg["pad_token_id"] is None:
        tcfg["pad_token_id"] = pad_id
    text_encoder = CLIPTextModel(CLIPTextConfig(**tcfg)).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    scheduler = DDIMScheduler(**spec["sched"])

    base = spec["seed"] * 1000
    reinit_(text_encoder, base + 1)
    reinit_(unet, base + 2)
    # the VAE decoder output is (image - 0.5) * 2; keep its spread moderate so the generated
    # image is not saturated by the pipeline's clamp(0, 1)
    reinit_(vae, base + 3, out_gain={"decoder.conv_out": 0.5})
    return text_encoder, unet, vae, scheduler


def sanity_checks(name: str, spec: dict, text_encoder, unet, vae) -> None:
    print(f"[{name}] sanity checks on freshly initialised fp32 models")
    g = torch.Generator().manual_seed(99)
    d = spec["text"]["hidden_size"]
    h, w = spec["unet_hw"]
    H, W = spec["vae_hw"]
    ids = torch.randint(0, spec["text"]["vocab_size"] - 2, (2, 77), generator=g)
    hs = text_encoder(ids).last_hidden_state
    print("  text last_hidden_state", stats(hs))
    grad_coverage(f"{name}/text_encoder", text_encoder,
                  (hs * torch.randn(hs.shape, generator=g)).sum(), skip=("token_embedding",))

    x = torch.randn(2, 4, h, w, generator=g)
    t = torch.tensor([981, 17])
    ehs = torch.randn(2, 77, d, generator=g)
    out = unet(x, t, ehs).sample
    print("  unet out", stats(out))
    grad_coverage(f"{name}/unet", unet, (out * torch.randn(out.shape, generator=g)).sum())
    with torch.no_grad():
        out = unet(x, t, ehs).sample
        out2 = unet(x, t, ehs + 0.5 * torch.randn(ehs.shape, generator=g)).sample
        out3 = unet(x, torch.tensor([980, 18]), ehs).sample
    rel = ((out2 - out).norm() / out.norm()).item()
    rel_t = ((out3 - out).norm() / out.norm()).item()
    print(f"  unet: relative change from perturbing encoder_hidden_states: {rel:.4f}; "
          f"from timestep +-1: {rel_t:.5f}")
    assert rel > 0.02, "UNet output barely depends on the text conditioning"
    assert rel_t > 1e-4, "UNet output barely depends on the timestep"

    img = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    post = vae.encode(img).latent_dist
    z = torch.randn(post.mean.shape, generator=g)
    dec = vae.decode(z).sample
    print("  vae mean", stats(post.mean), "\n  vae logvar", stats(post.logvar), "\n  vae decoded", stats(dec))
    loss = ((post.mean * torch.randn(post.mean.shape, generator=g)).sum()
            + (post.logvar * torch.randn(post.logvar.shape, generator=g)).sum()
            + (dec * torch.randn(dec.shape, generator=g)).sum())
    grad_coverage(f"{name}/vae", vae, loss)


LEGACY = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def save_safetensors_sorted(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors.save_file, but with a byte-stable header.

    The Rust writer behind save_file emits `__metadata__` in hash-map order, which differs
    between runs; re-serialise the header with sorted keys (tensor data/offsets unchanged).
    """
    from safetensors.torch import save
    import struct

    raw = save(tensors, metadata=metadata)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    hb = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    back = load_file(path)
    assert sorted(back) == sorted(tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(path, framework="pt") as fh:
        assert fh.metadata() == metadata


def legacy_vae_key(k: str) -> str:
    for part in ("encoder.mid_block.attentions.", "decoder.mid_block.attentions."):
        if k.startswith(part):
            prefix, rest = k[: len(part) + 2], k[len(part) + 2:]  # "...attentions.0." + rest
            assert prefix.endswith(".0."), k
            for new, old in LEGACY.items():
                if rest.startswith(new):
                    return prefix + old + rest[len(new):]
    return k


def save_model(name: str, spec: dict, out_dir: Path, tokenizer, text_encoder, unet, vae, scheduler) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if spec["fp16"]:
        text_encoder, unet, vae = text_encoder.half(), unet.half(), vae.half()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # tokenizer: exactly our files (transformers 5 would also write tokenizer.json etc.)
    write_tokenizer(name, out_dir / "tokenizer")
    # keep only config/json + safetensors weight files
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.suffix not in (".json", ".safetensors") and p.parent.name != "tokenizer":
            print(f"  removing {p.relative_to(out_dir)}")
            p.unlink()
    # model_index.json: drop the null optional components other than the two SD 1.x ones
    mi_path = out_dir / "model_index.json"
    mi = json.loads(mi_path.read_text())
    for k in list(mi):
        if isinstance(mi[k], list) and mi[k] == [None, None] and k not in ("safety_checker", "feature_extractor"):
            del mi[k]
    mi_path.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    if spec["legacy_vae_names"]:
        f = out_dir / "vae" / "diffusion_pytorch_model.safetensors"
        sd = {k: v.clone() for k, v in load_file(f).items()}  # detach from the file we overwrite
        new = {legacy_vae_key(k): v for k, v in sd.items()}
        renamed = sorted(k for k in new if k not in sd)
        assert len(renamed) == 16, renamed  # 2 mid blocks x 4 linears x (weight, bias)
        save_safetensors_sorted(new, f, {"format": "pt"})
        print(f"  vae: renamed {len(renamed)} keys to legacy names, e.g. {renamed[0]}")
    # weight dtype check
    for f in sorted(out_dir.rglob("*.safetensors")):
        dts = {str(v.dtype) for v in load_file(f).values()}
        want = "torch.float16" if spec["fp16"] else "torch.float32"
        assert dts == {want}, (f, dts)


def load_back(out_dir: Path):
    pipe = StableDiffusionPipeline.from_pretrained(out_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for comp in (pipe.text_encoder, pipe.unet, pipe.vae):
        comp.eval()
        dts = {p.dtype for p in comp.parameters()}
        assert dts == {torch.float32}, (type(comp).__name__, dts)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    return pipe


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------

def compute_refs(name: str, spec: dict, out_dir: Path, pipe) -> tuple[dict, dict]:
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    d = te.config.hidden_size
    g = torch.Generator().manual_seed(spec["seed"] * 1000 + 7)
    T: dict[str, torch.Tensor] = {}
    M: dict[str, str] = {
        "model": name,
        "generator": "scripts/make_fixtures.py",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    with torch.no_grad():
        # ---- text encoder
        prompts = spec["text_prompts"]
        enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        full = tok(prompts).input_ids
        assert len(full[1]) > 77, f"long prompt only has {len(full[1])} tokens"
        print(f"  text prompt token counts (untruncated, with bos/eos): {[len(x) for x in full]}")
        T["text.input_ids"] = enc.input_ids.to(torch.int64)
        T["text.last_hidden_state"] = te(T["text.input_ids"]).last_hidden_state
        M["text.prompts"] = json.dumps(prompts, ensure_ascii=False)

        # ---- unet
        h, w = spec["unet_hw"]
        T["unet.sample"] = torch.randn(2, 4, h, w, generator=g)
        T["unet.timestep"] = torch.tensor([981, 17], dtype=torch.int64)
        T["unet.encoder_hidden_states"] = torch.randn(2, 77, d, generator=g)
        T["unet.out"] = unet(T["unet.sample"], T["unet.timestep"], T["unet.encoder_hidden_states"]).sample

        # ---- vae
        H, W = spec["vae_hw"]
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        T["vae.image"] = torch.rand(1, 3, H, W, generator=g) * 2 - 1
        post = vae.encode(T["vae.image"]).latent_dist
        T["vae.latent_mean"] = post.mean
        T["vae.latent_logvar"] = post.logvar
        T["vae.z"] = torch.randn(1, 4, H // f, W // f, generator=g)
        T["vae.decoded"] = vae.decode(T["vae.z"]).sample

        # ---- schedulers (fresh instances from the saved folder)
        sch = DDIMScheduler.from_pretrained(out_dir / "scheduler")
        sch.set_timesteps(10)
        T["sched.timesteps"] = sch.timesteps.to(torch.int64).clone()
        sample = torch.randn(1, 4, h, w, generator=g)
        mo = torch.randn(1, 4, h, w, generator=g)
        T["sched.sample"], T["sched.model_output"] = sample, mo
        t = int(sch.timesteps[3])
        T["sched.t"] = torch.tensor([t], dtype=torch.int64)
        T["sched.prev_sample"] = sch.step(mo, t, sample, eta=0.0).prev_sample
        t_last = int(sch.timesteps[-1])
        T["sched.t_last"] = torch.tensor([t_last], dtype=torch.int64)
        T["sched.prev_sample_last"] = sch.step(mo, t_last, sample, eta=0.0).prev_sample
        T["sched.alphas_cumprod"] = sch.alphas_cumprod.clone()
        if sch.config.prediction_type == "v_prediction":
            # the training target of a v-prediction model (diffusers' train scripts:
            # noise_scheduler.get_velocity(latents, noise, timesteps))
            from diffusers import DDPMScheduler
            ddpm = DDPMScheduler.from_pretrained(out_dir / "scheduler")
            x0, noise = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 4, h, w, generator=g)
            tt = torch.tensor([999, 7], dtype=torch.int64)
            T["sched.velocity_x0"], T["sched.velocity_noise"], T["sched.velocity_t"] = x0, noise, tt
            T["sched.velocity"] = ddpm.get_velocity(x0, noise, tt)
        M["sched.num_inference_steps"] = "10"
        M["sched.eta"] = "0.0"

        inv = DDIMInverseScheduler.from_pretrained(out_dir / "scheduler")
        inv.set_timesteps(10)
        T["sched_inv.timesteps"] = inv.timesteps.to(torch.int64).clone()
        t_inv = int(inv.timesteps[3])
        T["sched_inv.t"] = torch.tensor([t_inv], dtype=torch.int64)
        T["sched_inv.next_sample"] = inv.step(mo, t_inv, sample).prev_sample
        t0 = int(inv.timesteps[0])
        T["sched_inv.t_first"] = torch.tensor([t0], dtype=torch.int64)
        T["sched_inv.next_sample_first"] = inv.step(mo, t0, sample).prev_sample
        print(f"  sched.timesteps {T['sched.timesteps'].tolist()}  sched_inv.timesteps "
              f"{T['sched_inv.timesteps'].tolist()}")

    # ---- full pipeline run
    gs = spec["gen"]
    gen_refs(pipe, gs, T, M)
    for k, v in T.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
        T[k] = v.detach().contiguous()
    return T, M


def gen_refs(pipe, gs: dict, T: dict, M: dict) -> None:
    tok = pipe.tokenizer
    cap: dict = {"timesteps": []}
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        lat = orig_prepare(*a, **k)
        cap["init"] = lat.clone()
        return lat

    pipe.prepare_latents = prepare_latents

    def on_step_end(p, i, t, kw):
        cap["timesteps"].append(int(t))
        if i == gs["steps"] - 1:
            cap["final"] = kw["latents"].clone()
        return kw

    def run(latents=None):
        return pipe(
            prompt=gs["prompt"], negative_prompt=gs["negative_prompt"],
            num_inference_steps=gs["steps"], guidance_scale=gs["guidance"],
            height=gs["height"], width=gs["width"], num_images_per_prompt=gs["num_images"],
            generator=torch.Generator("cpu").manual_seed(gs["seed"]), latents=latents,
            output_type="np", callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images

    with torch.no_grad():
        images = run()
    f = pipe.vae_scale_factor
    shape = (gs["num_images"], pipe.unet.config.in_channels, gs["height"] // f, gs["width"] // f)
    expect_init = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(gs["seed"]))
    assert torch.equal(cap["init"], expect_init), "pipeline initial latents != torch.randn(shape, seeded gen)"
    init, final, steps_t = cap["init"], cap["final"], list(cap["timesteps"])
    # rerun with the recorded latents: must give the identical image
    cap["timesteps"].clear()
    with torch.no_grad():
        images2 = run(latents=init.clone())
    assert np.array_equal(images, images2), "rerun with latents=gen.latents_init differs"
    pipe.prepare_latents = orig_prepare

    def ids(text):
        return tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(torch.int64)

    T["gen.latents_init"] = init
    T["gen.timesteps"] = torch.tensor(steps_t, dtype=torch.int64)
    T["gen.cond_ids"] = ids(gs["prompt"])
    T["gen.uncond_ids"] = ids(gs["negative_prompt"] if gs["negative_prompt"] is not None else "")
    with torch.no_grad():
        T["gen.cond_embeds"] = pipe.text_encoder(T["gen.cond_ids"]).last_hidden_state
        T["gen.uncond_embeds"] = pipe.text_encoder(T["gen.uncond_ids"]).last_hidden_state
    T["gen.latents_final"] = final
    T["gen.image_float"] = torch.from_numpy(np.ascontiguousarray(images)).float()
    T["gen.image_u8"] = torch.from_numpy((images * 255).round().astype("uint8"))
    # numpy_to_pil does exactly this conversion; check against it
    pil = pipe.numpy_to_pil(images)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), T["gen.image_u8"].numpy())
    im = T["gen.image_float"]
    print(f"  gen: timesteps {steps_t}; latents_final {stats(final)}; image mean {im.mean():.3f}, "
          f"fraction at 0/1: {((im == 0) | (im == 1)).float().mean():.3f}")
    M.update({
        "prompt": gs["prompt"],
        "seed": str(gs["seed"]), "steps": str(gs["steps"]), "guidance": repr(float(gs["guidance"])),
        "height": str(gs["height"]), "width": str(gs["width"]), "num_images": str(gs["num_images"]),
        "eta": "0.0", "scheduler": "DDIMScheduler (from scheduler/scheduler_config.json)",
    })
    if gs["negative_prompt"] is not None:
        M["negative_prompt"] = gs["negative_prompt"]


# --------------------------------------------------------------------------------------------
# Tokenizer cases
# --------------------------------------------------------------------------------------------

TOKENIZER_CASES = [
    "",
    "a photo of a sks dog",
    "A Photo Of A SKS Dog",
    "a  photo\tof\na   sks\r\n dog",
    "   leading and trailing spaces   ",
    "Hello!!! What?!... (yes) [no] {maybe} --- *** ,,, ;;",
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "it\u2019s a dog\u2019s life \u2014 \u201cquoted\u201d",
    "12345 and 3.14 and 1,000,000",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m r\u00e9sum\u00e9 fa\u00e7ade",
    "cafe\u0301 (decomposed accent)",
    "\u00c0\u00c9\u00ce\u00d5\u00dc uppercase accents",
    "stra\u00dfe \u0130stanbul",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "emoji \U0001f436\U0001f389 party",
    "&amp; &lt;b&gt; &quot;html&quot;",
    "<|startoftext|>inside<|endoftext|> text",
    "a <|endoftext|> b <|startoftext|>",
    "<|STARTOFTEXT|> upper <|EndOfText|>",
    "state-of-the-art well-known x-ray",
    "word</w> and </w> alone",
    "hello! !!! !",
    "email@example.com https://example.com/path?q=1",
    "snake_case camelCase PascalCase",
    "tabs\t\tand\u00a0nbsp\u3000ideographic",
    "zero\u200bwidth",
    "\u03a9\u2248\u00e7\u221a\u222b math \u2211 symbols \u00b1",
    "x" * 100,
    "a photo of sks dog, highly detailed, 8k, trending on artstation",
    "an extremely long prompt that keeps going " * 12,
]


def tokenizer_cases(out: Path) -> None:
    try:
        import ftfy  # noqa: F401
        have_ftfy = True
    except ImportError:
        have_ftfy = False
    doc = {
        "generator": "scripts/make_fixtures.py",
        "transformers": transformers.__version__,
        "tokenizers": __import__("tokenizers").__version__,
        "ftfy_installed": have_ftfy,
        "call": "CLIPTokenizer.from_pretrained(folder)(text, padding='max_length', max_length=77, "
                "truncation=True).input_ids",
        "cases": {},
    }
    for folder in ("tiny-a/tokenizer", "tiny-b/tokenizer"):
        tok = CLIPTokenizer.from_pretrained(FIX / folder)
        rows = []
        for text in TOKENIZER_CASES:
            ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
            assert len(ids) == 77
            rows.append({"text": text, "ids": ids})
        doc["cases"][folder] = rows
    sks = doc["cases"]["tiny-a/tokenizer"][1]
    assert sks["ids"][:8] == [49406, 320, 1125, 539, 320, 48136, 1929, 49407], sks
    out.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def check_tokenizer(name: str, tok) -> int:
    """Print a few tokenizations; return the pad id."""
    print(f"[{name}] tokenizer {type(tok).__name__}: vocab {len(tok)}, bos {tok.bos_token_id}, "
          f"eos {tok.eos_token_id}, pad {tok.pad_token!r}={tok.pad_token_id}, "
          f"model_max_length {tok.model_max_length}")
    for s in ("a photo of a sks dog", "Hello, World!"):
        ids = tok(s).input_ids
        print(f"    {s!r} -> {ids} {tok.convert_ids_to_tokens(ids)}")
    assert tok.model_max_length == 77
    return tok.pad_token_id


# --------------------------------------------------------------------------------------------

def main() -> None:
    check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name, spec in SPECS.items():
        out_dir = FIX / name
        print(f"=== {name} -> {out_dir.relative_to(ROOT)}")
        tmp_tok = FIX / f".{name}-tokenizer.tmp"
        write_tokenizer(name, tmp_tok)
        tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
        shutil.rmtree(tmp_tok)
        pad_id = check_tokenizer(name, tokenizer)
        if name in ("tiny-b", "tiny-sd2"):
            assert (pad_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 998, 999)
        else:
            assert (pad_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (49407, 49406, 49407)

        te, unet, vae, sched = build_models(name, spec, pad_id)
        sanity_checks(name, spec, te, unet, vae)
        fp32_copies = {k: {kk: vv.clone() for kk, vv in m.state_dict().items()}
                       for k, m in (("text_encoder", te), ("unet", unet), ("vae", vae))}
        save_model(name, spec, out_dir, tokenizer, te, unet, vae, sched)

        pipe = load_back(out_dir)
        # the loaded (upcast) weights equal the in-memory ones (fp16-rounded for tiny-a); for
        # tiny-b this also proves the legacy-named VAE file loads into the modern names
        for comp_name, sd in fp32_copies.items():
            loaded = getattr(pipe, comp_name).state_dict()
            assert sorted(loaded) == sorted(sd), (comp_name, set(loaded) ^ set(sd))
            for k, v in sd.items():
                if not v.is_floating_point():
                    continue
                want = v.float().half().float() if spec["fp16"] else v.float()
                assert torch.equal(want, loaded[k]), (name, comp_name, k)
        print(f"  reloaded weights match ({'fp16-rounded' if spec['fp16'] else 'exact'})")

        T, M = compute_refs(name, spec, out_dir, pipe)
        ref_path = FIX / f"{name}.ref.safetensors"
        save_safetensors_sorted(T, ref_path, M)
        print(f"  wrote {ref_path.relative_to(ROOT)}: {len(T)} tensors")
        for k in sorted(T):
            print(f"    {k:30s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")

    tokenizer_cases(FIX / "tokenizer_cases.json")
    print("wrote tests/fixtures/tokenizer_cases.json")


if __name__ == "__main__":
    main()
