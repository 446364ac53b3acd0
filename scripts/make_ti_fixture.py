#!/usr/bin/env python3
"""Build the textual-inversion parity fixture (diffusers' `load_textual_inversion`).

Run by hand from the repository root, after scripts/make_fixtures.py (CPU only, a few seconds):

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_ti_fixture.py

It (re)writes, deterministically (a rerun gives byte-identical files):

    tests/fixtures/ti/learned_embeds.safetensors  {"<sks-toy>": (2, 32) f32}  multi-vector
    tests/fixtures/ti/single.safetensors          {"<cat-toy>": (1, 32) f32}  one vector
    tests/fixtures/ti.ref.safetensors             tokenizer ids, text embeddings, pipeline run
                                                  of tiny-a with both embeddings loaded

See the "Textual inversion" section of tests/fixtures/README.md for keys and the behaviour they
pin down. Pinned versions: scripts/requirements-fixtures.txt (asserted, as in make_fixtures.py).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

from make_fixtures import check_versions, save_safetensors_sorted, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODEL = FIX / "tiny-a"
TI_DIR = FIX / "ti"
REF = FIX / "ti.ref.safetensors"

# (file name, token, number of vectors); loaded in this order
EMBEDDINGS = [
    ("learned_embeds.safetensors", "<sks-toy>", 2),
    ("single.safetensors", "<cat-toy>", 1),
]
EMB_SEED = 4242

GEN = dict(
    prompt="A photo of <sks-toy> next to a <cat-toy>, studio light",
    negative_prompt="blurry",
    seed=77, steps=6, guidance=7.5, height=32, width=32, num_images=1,
)

# Tokenized WITHOUT maybe_convert_prompt (ids -> `added_token_cases`), and also through
# maybe_convert_prompt (converted string + ids -> `convert_cases`).
CASES = [
    "<sks-toy>",
    "<sks-toy>,",
    "(<sks-toy>)",
    "(<sks-toy>:1.2), <cat-toy>.",
    "<SKS-TOY> and <Cat-Toy>",
    "a<sks-toy>b",
    "photo of<cat-toy>s",
    "<sks-toy><cat-toy><sks-toy>",
    "  <sks-toy>\t\t<cat-toy>  ",
    "<sks-toy>_1",
    "<sks-toy> <sks-toy>_1",
    "<sks-toy>_12",
    "<sks-toy >",
    "sks-toy",
    "<|startoftext|><sks-toy><|endoftext|>",
]


def ids77(tok, text: str) -> list[int]:
    ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    return ids


def make_embedding_files(d: int, std: float) -> dict[str, torch.Tensor]:
    """Write the two embedding files; return {token: (n, d) tensor}."""
    TI_DIR.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(EMB_SEED)
    out = {}
    for fname, token, n in EMBEDDINGS:
        t = (torch.randn(n, d, generator=g) * std).contiguous()
        # diffusers' textual_inversion.py saves {token: (n, d)} with metadata {"format": "pt"}
        save_safetensors_sorted({token: t}, TI_DIR / fname, {"format": "pt"})
        out[token] = t
        print(f"  wrote {(TI_DIR / fname).relative_to(ROOT)}: {token!r} {stats(t)}")
    return out


def main() -> None:
    check_versions()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # resize_token_embeddings draws the (later overwritten) new rows from the global RNG
    torch.manual_seed(0)

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    tok, te = pipe.tokenizer, pipe.text_encoder
    base_emb = te.get_input_embeddings().weight.detach().clone()  # (V, d)
    V, d = base_emb.shape
    assert len(tok) == V == 49408, (len(tok), V)
    std = base_emb.std().item()
    print(f"tiny-a token embedding: {tuple(base_emb.shape)} std {std:.4f}")
    vectors = make_embedding_files(d, round(std, 1))

    # ---- load both embeddings the way a user does (from the files just written)
    for fname, _, _ in EMBEDDINGS:
        pipe.load_textual_inversion(str(TI_DIR / fname))
    tokens = []
    for _, token, n in EMBEDDINGS:
        tokens += [token] + [f"{token}_{i}" for i in range(1, n)]
    added_ids = [tok.convert_tokens_to_ids(t) for t in tokens]
    assert added_ids == list(range(V, V + len(tokens))), added_ids
    emb = te.get_input_embeddings().weight.detach()
    assert emb.shape == (V + len(tokens), d), emb.shape
    assert torch.equal(emb[:V], base_emb), "load_textual_inversion changed existing rows"
    assert torch.equal(emb[V:], torch.cat([vectors[t] for _, t, _ in EMBEDDINGS])), "TI rows differ"
    for t, i in zip(tokens, added_ids):
        at = tok.added_tokens_decoder[i]
        print(f"  added {i} {at!r}")
        assert at.content == t and not at.special and at.normalized and not at.single_word
        assert not at.lstrip and not at.rstrip

    # ---- converted prompt and ids, as encode_prompt computes them
    conv = pipe.maybe_convert_prompt(GEN["prompt"], tok)
    conv_neg = pipe.maybe_convert_prompt(GEN["negative_prompt"], tok)
    assert conv == "A photo of <sks-toy> <sks-toy>_1 next to a <cat-toy>, studio light", conv
    assert conv_neg == GEN["negative_prompt"]
    cond_ids = torch.tensor([ids77(tok, conv)], dtype=torch.int64)
    uncond_ids = torch.tensor([ids77(tok, conv_neg)], dtype=torch.int64)
    print(f"  converted prompt {conv!r}\n  cond ids {cond_ids[0, :16].tolist()}")
    for i in added_ids:
        assert (cond_ids == i).sum() == 1, (i, cond_ids)

    # ---- pipeline run; capture what the text encoder really got, init and final latents
    cap: dict = {"te_in": [], "te_out": [], "timesteps": []}

    def te_pre(mod, args, kwargs):
        cap["te_in"].append((args[0] if args else kwargs["input_ids"]).clone())

    def te_post(mod, args, kwargs, out):
        cap["te_out"].append(out[0].detach().clone())

    h1 = te.register_forward_pre_hook(te_pre, with_kwargs=True)
    h2 = te.register_forward_hook(te_post, with_kwargs=True)
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **k):
        lat = orig_prepare(*a, **k)
        cap["init"] = lat.clone()
        return lat

    pipe.prepare_latents = prepare_latents

    def on_step_end(p, i, t, kw):
        cap["timesteps"].append(int(t))
        if i == GEN["steps"] - 1:
            cap["final"] = kw["latents"].clone()
        return kw

    def run(prompt=GEN["prompt"]):
        return pipe(
            prompt=prompt, negative_prompt=GEN["negative_prompt"],
            num_inference_steps=GEN["steps"], guidance_scale=GEN["guidance"],
            height=GEN["height"], width=GEN["width"], num_images_per_prompt=GEN["num_images"],
            generator=torch.Generator("cpu").manual_seed(GEN["seed"]), eta=0.0,
            output_type="np", callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images

    with torch.no_grad():
        images = run()
    h1.remove()
    h2.remove()
    pipe.prepare_latents = orig_prepare
    assert len(cap["te_in"]) == 2, len(cap["te_in"])
    assert torch.equal(cap["te_in"][0], cond_ids), (cap["te_in"][0], cond_ids)
    assert torch.equal(cap["te_in"][1], uncond_ids), (cap["te_in"][1], uncond_ids)
    with torch.no_grad():
        cond_embeds = te(cond_ids).last_hidden_state
        uncond_embeds = te(uncond_ids).last_hidden_state
    assert torch.equal(cap["te_out"][0], cond_embeds) and torch.equal(cap["te_out"][1], uncond_embeds)
    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, GEN["height"] // f, GEN["width"] // f)
    assert torch.equal(cap["init"], torch.randn(shape, generator=torch.Generator("cpu").manual_seed(GEN["seed"])))
    image_u8 = (images * 255).round().astype("uint8")
    pil = pipe.numpy_to_pil(images)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), image_u8)

    # ---- the embeddings matter: the same run with the prompt written without TI tokens differs
    with torch.no_grad():
        plain = run("A photo of sks-toy next to a cat-toy, studio light")
        mask = cond_ids[0] >= V
        saved = emb.clone()
        te.get_input_embeddings().weight.data[V:] = torch.randn(len(tokens), d, generator=torch.Generator().manual_seed(1)) * 0.5
        cond_pert = te(cond_ids).last_hidden_state
        te.get_input_embeddings().weight.data.copy_(saved)
    rel_txt = ((cond_pert - cond_embeds).norm() / cond_embeds.norm()).item()
    rel_img = float(np.abs(plain - images).mean())
    print(f"  TI positions {mask.nonzero().flatten().tolist()}; text-embedding rel. change when the "
          f"TI vectors are replaced: {rel_txt:.3f}; mean |image diff| vs. prompt without TI tokens: "
          f"{rel_img:.4f}")
    assert rel_txt > 0.05 and rel_img > 0.01

    # ---- tokenization cases (after loading both embeddings)
    added_cases, convert_cases = [], []
    for text in CASES:
        added_cases.append({"text": text, "ids": ids77(tok, text)})
        c = pipe.maybe_convert_prompt(text, tok)
        convert_cases.append({"text": text, "converted": c, "ids": ids77(tok, c)})
        n = added_cases[-1]["ids"].index(tok.eos_token_id)
        print(f"  {text!r:42} -> {tok.convert_ids_to_tokens(added_cases[-1]['ids'][:n + 1])}")
        if c != text:
            m = convert_cases[-1]["ids"].index(tok.eos_token_id)
            print(f"  {'':42}    converted {c!r} -> {convert_cases[-1]['ids'][:m + 1]}")

    T = {
        "ti.cond_ids": cond_ids,
        "ti.uncond_ids": uncond_ids,
        "ti.added_ids": torch.tensor(added_ids, dtype=torch.int64),
        "ti.cond_embeds": cond_embeds,
        "ti.uncond_embeds": uncond_embeds,
        "ti.latents_init": cap["init"],
        "ti.timesteps": torch.tensor(cap["timesteps"][:GEN["steps"]], dtype=torch.int64),
        "ti.latents_final": cap["final"],
        "ti.image_float": torch.from_numpy(np.ascontiguousarray(images)).float(),
        "ti.image_u8": torch.from_numpy(image_u8),
    }
    for k, v in T.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
        T[k] = v.detach().contiguous()
    M = {
        "generator": "scripts/make_ti_fixture.py",
        "model": "tiny-a",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "ti_files": json.dumps([f"ti/{f}" for f, _, _ in EMBEDDINGS]),
        "tokens": json.dumps(tokens),
        "prompt": GEN["prompt"],
        "converted_prompt": conv,
        "negative_prompt": GEN["negative_prompt"],
        "converted_negative_prompt": conv_neg,
        "seed": str(GEN["seed"]), "steps": str(GEN["steps"]), "guidance": repr(float(GEN["guidance"])),
        "height": str(GEN["height"]), "width": str(GEN["width"]), "num_images": str(GEN["num_images"]),
        "eta": "0.0", "scheduler": "DDIMScheduler (from scheduler/scheduler_config.json)",
        "added_token_cases": json.dumps(added_cases, ensure_ascii=False, separators=(",", ":")),
        "convert_cases": json.dumps(convert_cases, ensure_ascii=False, separators=(",", ":")),
    }
    save_safetensors_sorted(T, REF, M)
    print(f"wrote {REF.relative_to(ROOT)}: {len(T)} tensors")
    for k in sorted(T):
        print(f"    {k:20s} {str(T[k].dtype):14s} {tuple(T[k].shape)}")
    print(f"  timesteps {T['ti.timesteps'].tolist()}; latents_final {stats(T['ti.latents_final'])}; "
          f"image mean {images.mean():.3f}")
    # the embedding files read back as written
    for fname, token, n in EMBEDDINGS:
        back = load_file(TI_DIR / fname)
        assert list(back) == [token] and back[token].shape == (n, d)


if __name__ == "__main__":
    main()
