#!/usr/bin/env python3
"""Reference data for src/tokenizer.rs, computed with transformers 5.24.0's CLIPTokenizer.

Run from the repository root:

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_tokenizer_cases.py
        writes tests/fixtures/tokenizer_extra_cases.json and
        tests/fixtures/tokenizers/clip-small-json/{vocab-merges,tokenizer-json}/

    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_tokenizer_cases.py --nfc-tables
        regenerates the NFC tables at the end of src/tokenizer.rs from the `tokenizers` library
        (the normaliser transformers uses; its Unicode data differs slightly from Python's).

Deterministic: a rerun gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import normalizers  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CLIP = FIX / "tokenizers" / "clip"
SMALL = FIX / "tokenizers" / "clip-small-json"
OUT = FIX / "tokenizer_extra_cases.json"
PINS = {"transformers": "5.24.0", "tokenizers": "0.23.3"}

E, B = "<|endoftext|>", "<|startoftext|>"

# Awkward strings for the real SD-1.x tokenizer folder.
PLAIN_CASES = [
    "",
    " ",
    "a photo of a sks dog",
    "  A   PHOTO\tof\n\na sks\r\ndog  ",
    "a\u00a0b\u1680c\u2000d\u2028e\u2029f\u202fg\u205fh\u3000i\u0085j\u000bk",
    "zero\u200bwidth\u180emongolian\ufeffbom\u2060joiner",
    "cafe\u0301 vs caf\u00e9 and e\u0323\u0301 and a\u0301\u0323 and \u212b\u2126",
    "\u1100\u1161\u11a8 \u1100\u1161 \uac00\u11a8 \ud55c\uad6d\uc5b4",
    "\uf900\uf9dc \u2f800x \U0001d15e \u0958 \u00c5\u030a",
    "\U00011935\U00011930 dives akuru",
    "Stra\u00dfe \u0130STANBUL \u1e9e \ufb01ne \u01c5 \u03a3\u039f\u03a3 \u0391\u0392\u0393",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 \u4e2d\u6587",
    "\U0001f436\U0001f389 \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd \u2764\ufe0f \U0001f1eb\U0001f1f7",
    "\u201cquoted\u201d \u2018single\u2019 \u00abguillemets\u00bb \u201elow\u201c it\u2019s",
    "0123456789 \u0663\u0664 \u00b2\u00b3 \u2167 \u2460 \uff11\uff12",
    "3.14159 1,000,000 -42 +7 1e10 0x1F",
    "&amp; &lt;b&gt; &quot;x&quot; &#39; &nbsp;",
    "it's IT'S don't we've they're I'm you'll he'd 's 't",
    "''s '''t x's'",
    "<|startoftext|>inside<|endoftext|>",
    "<|STARTOFTEXT|> <|ENDOFTEXT|> <|EndOfText|>",
    "a<|endoftext|>b<|startoftext|>c",
    "<|endoftext|><|endoftext|>",
    "<|endoftext|  <|startoftext >",
    "word</w> </w>",
    "hello!!! what?!... (yes) [no] {maybe} --- ***",
    "snake_case camelCase kebab-case x-ray",
    "email@example.com https://example.com/a?b=1#c",
    "\u00c0\u00c9\u00ce\u00d5\u00dc \u00e0\u00e9\u00ee\u00f5\u00fc",
    "\u2126\u2248\u00e7\u221a\u222b \u2211 \u00b1 \u00b5 \u00bd",
    "tab\t\tnewline\n\ncr\r\rff\u000c",
    "x" * 120,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "photo " * 40,
    "a photo of sks dog, highly detailed, 8k, trending on artstation",
    "\U0010ffff\U000e0001 \ue000 private",
    "\u0300\u0301 leading combining",
    "ﬀ ﬄ ǆ",
    "\u216b \u00bd \u338f \u2103 \u2122 \u33a1 \uff21\uff22\uff43",
    "A Photo of <|endoftext|> SKS, 2 dogs & 1 cat!",
    "\u1e9b\u0323 \u0344 \u0f73 \u0f75 \u0958\u093c \u2329\u232a",
]

# Tokens added as diffusers' load_textual_inversion adds them (tokenizer.add_tokens(token)).
ADDED_TOKENS = ["<cat-toy>", "Sks", "<DOG>", "my token", "sksdog", "<Émoji🐶>"]
ADDED_CASES = [
    "a photo of <cat-toy>",
    "a<cat-toy>.",
    "(<cat-toy>),<cat-toy>!",
    "<CAT-TOY> <Cat-Toy>",
    "<cat-toy><cat-toy>",
    "<cat-toy>s and s<cat-toy>",
    "  <cat-toy>  ",
    "<cat\u2010toy> <cat toy> < cat-toy>",
    "a sks dog, a Sks dog, a SKS dog",
    "asks whisks sksdog sksdogs SKSDOG",
    "<dog> <DOG> <Dog>",
    "my token, my   token, MY\tTOKEN, mytoken",
    "<\u00c9moji\U0001f436> <\u00e9moji\U0001f436> <E\u0301moji\U0001f436>",
    "<cat-toy><|endoftext|>sks",
    "sks " * 80,
]
ADDED_REFUSED = ["tok", "dog</w>", E, B, "<cat-toy>"]


def AT(c: str, normalized: bool = True, **kw) -> dict:
    d = {"__type": "AddedToken", "content": c, "lstrip": False, "normalized": normalized,
         "rstrip": False, "single_word": False}
    d.update(kw)
    return d


def ST(c: str, normalized: bool = True, **kw) -> dict:
    d = {"content": c, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    d.update(kw)
    return d


def DT(c: str, normalized: bool, special: bool = True, **kw) -> dict:
    d = {"content": c, "lstrip": False, "normalized": normalized, "rstrip": False,
         "single_word": False, "special": special}
    d.update(kw)
    return d


SD2_TC = {"add_prefix_space": False, "bos_token": AT(B), "do_lower_case": True, "eos_token": AT(E),
          "errors": "replace", "model_max_length": 77, "pad_token": E, "tokenizer_class": "CLIPTokenizer",
          "unk_token": AT(E)}
SD2_STM = {"bos_token": ST(B), "eos_token": ST(E), "pad_token": "!", "unk_token": ST(E)}

# Config variants (tokenizer_config.json, special_tokens_map.json) over the real vocab/merges.
CONFIGS = {
    "no-config": (None, None),
    "sd2-pad-bang": (SD2_TC, SD2_STM),
    "pad-bang-config-only-1e30": ({"pad_token": "!", "model_max_length": 1e30}, None),
    "strings-no-lowercase": ({"bos_token": B, "eos_token": E, "unk_token": E, "pad_token": E,
                              "do_lower_case": False, "model_max_length": 77}, None),
    "eos-obj-pad-str": ({"eos_token": AT(E), "pad_token": E}, None),
    "eos-str-pad-obj": ({"eos_token": E, "pad_token": AT(E)}, None),
    "stm-eos-str-pad-obj": (None, {"eos_token": E, "pad_token": ST(E)}),
    "eos-false-unk-true-pad-bang": ({"eos_token": AT(E, False), "unk_token": AT(E, True), "pad_token": "!"}, None),
    "eos-str-unk-obj-pad-str": ({"eos_token": E, "unk_token": AT(E), "pad_token": E}, None),
    "stm-overrides-config": ({"bos_token": AT(B, False), "eos_token": AT(E, False)}, {"bos_token": ST(B), "eos_token": E}),
    "added-tokens-decoder": ({"added_tokens_decoder": {"49406": DT(B, True), "49407": DT(E, True)},
                              "bos_token": B, "eos_token": E, "pad_token": E, "unk_token": E,
                              "model_max_length": 77}, {"pad_token": "!"}),
    "added-tokens-decoder-pad-bang-ti": ({"added_tokens_decoder": {
        "0": DT("!", False), "49406": DT(B, True), "49407": DT(E, True), "49408": DT("<cat-toy>", True, False)},
        "bos_token": B, "eos_token": E, "pad_token": "!", "unk_token": E}, None),
    "new-pad-unk-strings": ({"bos_token": AT(B), "eos_token": AT(E), "pad_token": "<pad>", "unk_token": "<unk>"}, None),
    "new-pad-unk-objects": ({"bos_token": AT(B), "eos_token": AT(E), "pad_token": AT("<pad>"), "unk_token": AT("<unk>")}, None),
    "extra-special-tokens": ({"extra_special_tokens": ["<y>", "<x>"]}, None),
    "additional-special-tokens": ({"additional_special_tokens": ["<x>"]}, None),
    "stm-additional-special-tokens": (None, {"additional_special_tokens": ["<z>"]}),
    "single-word-lstrip": ({"added_tokens_decoder": {
        "49406": DT(B, True), "49407": DT(E, False), "49408": DT("<sw>", True, False, single_word=True),
        "49409": DT("ab", False, False, single_word=True), "49410": DT("<ls>", True, False, lstrip=True, rstrip=True)}}, None),
    "max-len-16": ({"model_max_length": 16}, None),
}
CONFIG_CASES = [
    "<|STARTOFTEXT|> <|ENDOFTEXT|> hi! wow!! <|endoftext|>x",
    "<PAD> <pad> <UNK> <unk> <x> <y> <z> <X>",
    "a <cat-toy>! <CAT-TOY>",
    "x<sw>y <sw> _<sw>_ \u00e9<sw> 1<sw> <SW>",
    "ab xab abx ab. (ab) AB \u00e9ab",
    "a   <ls>   b <LS>",
    "a photo of a sks dog " * 6,
]


def check_versions() -> None:
    got = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    if got != PINS:
        sys.exit(f"version mismatch: want {PINS}, have {got}")


def make_folder(dst: Path, tc: dict | None, stm: dict | None, src: Path = CLIP) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, dst / f)
    if tc is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    if stm is not None:
        (dst / "special_tokens_map.json").write_text(json.dumps(stm), encoding="utf-8")


def padded(tok, text: str, max_length: int) -> list[int] | None:
    """The padded+truncated ids when truncation happens; None (and checked here) when they are
    just `ids` followed by pad ids."""
    ids = tok(text, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert len(ids) == max_length
    plain = tok(text).input_ids
    if len(plain) <= max_length:
        assert ids == plain + [tok.pad_token_id] * (max_length - len(plain)), text
        return None
    return ids


def dump(obj, indent: str = "") -> str:
    """JSON with one line per leaf object / list (compact arrays of ids)."""
    inner = indent + " "
    if isinstance(obj, dict) and any(isinstance(v, (dict, list)) and v and
                                     isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict))
                                     for v in obj.values()):
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return "[\n" + ",\n".join(inner + dump(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def added_list(tok) -> list[dict]:
    j = json.loads(tok.backend_tokenizer.to_str())
    return [{"content": a["content"], "id": a["id"], "normalized": a["normalized"], "special": a["special"]}
            for a in j["added_tokens"]]


def plain_section(tok) -> list[dict]:
    rows = []
    for text in PLAIN_CASES:
        ids = tok(text).input_ids
        rows.append({"text": text, "ids": ids, "padded": padded(tok, text, 77),
                     "tokens": tok.convert_ids_to_tokens(ids), "decoded": tok.decode(ids)})
    return rows


def normalizer_section(tok) -> list[dict]:
    """Normaliser outputs (NFC, whitespace, lowercase) for the plain cases, every canonical
    decomposition (recomposed by NFC), marks in non-canonical order, and cased letters."""
    norm = tok.backend_tokenizer.normalizer
    texts = list(PLAIN_CASES)
    decomposable = [chr(cp) for cp in range(0x110000)
                    if not 0xD800 <= cp < 0xE000 and unicodedata.decomposition(chr(cp))
                    and not unicodedata.decomposition(chr(cp)).startswith("<")]
    nfd = [unicodedata.normalize("NFD", c) for c in decomposable]
    for i in range(0, len(nfd), 60):
        texts.append(" ".join(nfd[i:i + 60]))
        texts.append("".join(d + "\u0323\u0301" for d in nfd[i:i + 60]))  # extra marks, reordered
    rng = random.Random(1234)
    marks = [chr(cp) for cp in range(0x300, 0x370)] + ["\u0591", "\u05b0", "\u093c", "\u094d", "\u3099",
                                                        "\u309a", "\u1dc0", "\u20d0", "\ufe20"]
    bases = "aeiouAEIOUcnsyzCNSYZ\u03b1\u03b5\u03c9\u0391\u0415\u0438\u304b\u30cf\u1100\u1161\uac00"
    for _ in range(40):
        texts.append("".join(rng.choice(bases) + "".join(rng.choice(marks) for _ in range(rng.randint(0, 3)))
                             for _ in range(30)))
    hangul = ["\u1100\u1161", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u1112\u1175\u11c2", "\uac00\u11a7",
              "\u1100\u1176", "\u1113\u1161", "\ud7a3\u11a8", "\u1100\u0300\u1161"]
    texts.append(" ".join(hangul))
    cased = [chr(cp) for lo, hi in [(0x80, 0x600), (0x1E00, 0x2000), (0x2100, 0x2200), (0x2C00, 0x2D30),
                                    (0xA640, 0xA800), (0xFF00, 0xFF60), (0x10400, 0x10450), (0x1E900, 0x1E922)]
             for cp in range(lo, hi) if chr(cp).lower() != chr(cp) or chr(cp).upper() != chr(cp)]
    for i in range(0, len(cased), 200):
        texts.append("".join(cased[i:i + 200]))
    return [{"text": t, "normalized": norm.normalize_str(t)} for t in texts]


def added_section() -> dict:
    tok = CLIPTokenizer.from_pretrained(CLIP)
    ids = []
    for t in ADDED_TOKENS:  # one by one, as diffusers' load_textual_inversion does
        assert t not in tok.get_vocab(), t
        tok.add_tokens(t)
        ids.append(tok.convert_tokens_to_ids(t))
    for t in ADDED_REFUSED:
        assert t in tok.get_vocab(), t  # diffusers would refuse these
    return {
        "tokens": ADDED_TOKENS,
        "ids": ids,
        "vocab_size": len(tok),
        "refused": ADDED_REFUSED,
        "cases": [{"text": t, "ids": tok(t).input_ids, "padded": padded(tok, t, 77)} for t in ADDED_CASES],
    }


def config_section(tmp: Path) -> list[dict]:
    out = []
    for name, (tc, stm) in CONFIGS.items():
        d = tmp / name
        make_folder(d, tc, stm)
        tok = CLIPTokenizer.from_pretrained(d)
        mml = tok.model_max_length if tok.model_max_length < 1e6 else 77
        out.append({
            "name": name,
            "tokenizer_config": tc,
            "special_tokens_map": stm,
            "model_max_length": mml,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
            "vocab_size": len(tok),
            "added_tokens": added_list(tok),
            "cases": [{"text": t, "ids": tok(t).input_ids, "padded": padded(tok, t, mml)} for t in CONFIG_CASES],
        })
    return out


SMALL_CASES = [
    "a photo of a sks dog",
    "the thing in the other thing, <|endoftext|> and <cat-toy>!",
    "Thin THE THREE café 123",
    "\U0001f436 \u201cquoted\u201d",
    "",
]


def small_section() -> dict:
    """A 602-token BPE (first 600 entries + bos/eos, first 88 merges) as vocab.json + merges.txt
    and as tokenizer.json (saved by transformers, with one added token)."""
    vocab = json.loads((CLIP / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    small = {t: i for t, i in by_id[:600]}
    small[B] = 600
    small[E] = 601
    lines = (CLIP / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = lines[1:1 + 88]
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        assert small[a + b] == 512 + i and a in small and b in small, m
    vm = SMALL / "vocab-merges"
    tj = SMALL / "tokenizer-json"
    if SMALL.exists():
        shutil.rmtree(SMALL)
    vm.mkdir(parents=True)
    (vm / "vocab.json").write_text(json.dumps(small, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (vm / "merges.txt").write_text(lines[0] + "\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(CLIP / f, vm / f)
    tok_vm = CLIPTokenizer.from_pretrained(vm)
    tok_vm.add_tokens("<cat-toy>")
    with tempfile.TemporaryDirectory() as t:
        tok_vm.save_pretrained(t)
        tj.mkdir(parents=True)
        doc = json.loads((Path(t) / "tokenizer.json").read_text(encoding="utf-8"))
        (tj / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        cfg = json.loads((Path(t) / "tokenizer_config.json").read_text(encoding="utf-8"))
        for k in ("is_local", "local_files_only", "name_or_path"):
            cfg.pop(k, None)
        (tj / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tok_vm = CLIPTokenizer.from_pretrained(vm)  # without the added token
    tok_tj = CLIPTokenizer.from_pretrained(tj)
    assert len(tok_tj) == 603, len(tok_tj)
    return {
        "vocab-merges": [{"text": t, "ids": tok_vm(t).input_ids} for t in SMALL_CASES],
        "tokenizer-json": [{"text": t, "ids": tok_tj(t).input_ids} for t in SMALL_CASES],
        "tokenizer-json-added": added_list(tok_tj),
    }


def write_cases() -> None:
    tok = CLIPTokenizer.from_pretrained(CLIP)
    assert tok("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    with tempfile.TemporaryDirectory() as t:
        configs = config_section(Path(t))
    doc = {
        "generator": "scripts/make_tokenizer_cases.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "folder": "tokenizers/clip",
        "calls": {"ids": "CLIPTokenizer.from_pretrained(folder)(text).input_ids",
                  "padded": "tok(text, padding='max_length', max_length=model_max_length, truncation=True).input_ids"},
        "plain": plain_section(tok),
        "normalizer": normalizer_section(tok),
        "added": added_section(),
        "configs": configs,
        "small": small_section(),
    }
    OUT.write_text(dump(doc) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} and {SMALL.relative_to(ROOT)}/")


# ---------------------------------------------------------------------------------------------
# NFC tables


def nfc_tables() -> tuple[list[int], list[int]]:
    NFD = normalizers.NFD()
    NFC = normalizers.NFC()
    # Canonical combining classes: Python's, kept only where `tokenizers` reorders accordingly.
    ccc = {}
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        k = unicodedata.combining(chr(cp))
        if not k:
            continue
        m = chr(cp)
        if k < 230:
            known = NFD.normalize_str("\u0301" + m) == m + "\u0301"  # U+0301 has class 230
        else:
            known = NFD.normalize_str(m + "\u0323") == "\u0323" + m  # U+0323 has class 220
        if known:
            ccc[cp] = k
    ranges = []
    for cp in sorted(ccc):
        if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == ccc[cp]:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp, ccc[cp]])
    # One-level canonical decompositions (Hangul is algorithmic), kept where `tokenizers` agrees.
    decomp = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000 or 0xAC00 <= cp < 0xAC00 + 11172:
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        if NFD.normalize_str(chr(cp)) == chr(cp):
            continue  # newer than the tokenizers' tables
        parts = [int(x, 16) for x in d.split()]
        assert len(parts) in (1, 2), (cp, d)
        full = unicodedata.normalize("NFD", chr(cp))
        assert NFD.normalize_str(chr(cp)) == full, hex(cp)
        a, b = parts[0], (parts[1] if len(parts) == 2 else 0)
        composes = b != 0 and NFC.normalize_str(chr(a) + chr(b)) == chr(cp)
        decomp.append(((cp | (0 if composes else 0x80000000)), a, b))
    # Everything below U+0300 is NFC (the fast path of nfc()).
    for cp in range(0x300):
        assert NFC.normalize_str(chr(cp)) == chr(cp)
    assert all(b == 0 or b >= 0x300 for _, _, b in decomp)
    flat_ccc = [x for r in ranges for x in r]
    flat_dec = [x for e in decomp for x in e]
    return flat_ccc, flat_dec


def rust_str(name: str, entries: list[str], comment: str) -> str:
    """A `&str` constant of space-separated entries, wrapped with `\\` line continuations."""
    lines = [f"    /// {comment}", f"    static {name}: &str = \"\\"]
    cur = ""
    for e in entries:
        if cur and len(cur) + len(e) + 1 > 96:
            lines.append("        " + cur + " \\")
            cur = ""
        cur = f"{cur} {e}" if cur else e
    lines.append("        " + cur + "\";")
    return "\n".join(lines)


def write_nfc_tables() -> None:
    flat_ccc, flat_dec = nfc_tables()
    ccc = [f"{a:X}:{k}" if a == b else f"{a:X}-{b:X}:{k}"
           for a, b, k in zip(flat_ccc[0::3], flat_ccc[1::3], flat_ccc[2::3])]
    dec = []
    for c, a, b in zip(flat_dec[0::3], flat_dec[1::3], flat_dec[2::3]):
        mark = "!" if c & 0x80000000 else ""
        dec.append(f"{mark}{c & 0x7FFFFFFF:X}={a:X}" + (f"+{b:X}" if b else ""))
    src = ROOT / "src" / "tokenizer.rs"
    text = src.read_text(encoding="utf-8")
    begin = "    // BEGIN GENERATED NFC TABLES (scripts/make_tokenizer_cases.py --nfc-tables)\n"
    end = "    // END GENERATED NFC TABLES\n"
    i, j = text.index(begin), text.index(end)
    body = "\n".join([
        rust_str("CCC_DATA", ccc, f"Non-zero canonical combining classes, `first[-last]:class` (hex code "
                                  f"points); {len(ccc)} ranges."),
        rust_str("DECOMP_DATA", dec, f"One-level canonical decompositions `[!]char=first[+second]` (hex; "
                                     f"`!`: excluded from composition), Hangul excepted; {len(dec)} entries."),
    ]) + "\n"
    src.write_text(text[:i + len(begin)] + body + text[j:], encoding="utf-8")
    print(f"wrote NFC tables into {src.relative_to(ROOT)}: {len(ccc)} ccc ranges, {len(dec)} decompositions")


if __name__ == "__main__":
    check_versions()
    if "--nfc-tables" in sys.argv[1:]:
        write_nfc_tables()
    else:
        write_cases()
