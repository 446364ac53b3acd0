//! CLIP tokenizer against transformers 5.24.0 `CLIPTokenizer` references.
//!
//! References: tests/fixtures/tokenizer_cases.json (scripts/make_fixtures.py, the tiny-a/tiny-b
//! tokenizer folders) and tests/fixtures/tokenizer_extra_cases.json
//! (scripts/make_tokenizer_cases.py: awkward strings, added tokens, special-token config
//! variants, normaliser outputs, a small BPE as vocab.json + merges.txt and as tokenizer.json).

use hifi_tuner::tokenizer::{normalize, ClipTokenizer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod common;

use common::fixtures;

fn clip_dir() -> PathBuf {
    fixtures().join("tokenizers/clip")
}

fn clip() -> ClipTokenizer {
    ClipTokenizer::from_dir(&clip_dir()).expect("load the CLIP tokenizer fixture")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn extra() -> Value {
    read_json(&fixtures().join("tokenizer_extra_cases.json"))
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an id list, got {v}"))
        .iter()
        .map(|x| x.as_i64().expect("integer id"))
        .collect()
}

fn text_of(v: &Value) -> &str {
    v["text"].as_str().expect("case text")
}

/// The padded reference of a case: stored when truncation happens, else ids + pad ids.
fn padded_ref(case: &Value, max: usize, pad: i64) -> Vec<i64> {
    match &case["padded"] {
        Value::Null => {
            let mut ids = ids_of(&case["ids"]);
            assert!(ids.len() <= max);
            ids.resize(max, pad);
            ids
        }
        p => ids_of(p),
    }
}

/// Checks `encode` and `encode_padded` against a reference case; returns a description of the
/// mismatch, if any.
fn check_case(tok: &ClipTokenizer, case: &Value, what: &str) -> Option<String> {
    let text = text_of(case);
    let want = ids_of(&case["ids"]);
    let got = tok.encode(text);
    if got != want {
        return Some(format!("{what}: encode({text:?})\n   got  {got:?}\n   want {want:?}"));
    }
    let max = tok.model_max_length();
    let want_padded = padded_ref(case, max, tok.pad_id());
    let enc = tok.encode_padded(text);
    if enc.ids != want_padded {
        return Some(format!("{what}: encode_padded({text:?})\n   got  {:?}\n   want {want_padded:?}", enc.ids));
    }
    if enc.truncated != (want.len() > max) || enc.n_tokens != want.len().min(max) {
        return Some(format!(
            "{what}: encode_padded({text:?}): truncated {} n_tokens {}, want {} and {}",
            enc.truncated,
            enc.n_tokens,
            want.len() > max,
            want.len().min(max)
        ));
    }
    None
}

fn assert_no_failures(failures: Vec<String>, total: usize) {
    assert!(failures.is_empty(), "{} of {total} cases differ:\n{}", failures.len(), failures.join("\n"));
}

/// A temporary tokenizer folder with the real vocab.json + merges.txt and the given configs.
fn folder_with(tc: &Value, stm: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(clip_dir().join(f), dir.path().join(f)).expect("copy vocab/merges");
    }
    for (name, v) in [("tokenizer_config.json", tc), ("special_tokens_map.json", stm)] {
        if !v.is_null() {
            std::fs::write(dir.path().join(name), v.to_string()).expect("write config");
        }
    }
    dir
}

fn load_err(dir: &Path) -> String {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn sks_dog_prompt() {
    let tok = clip();
    let want = [49406, 320, 1125, 539, 320, 48136, 1929, 49407];
    assert_eq!(tok.encode("a photo of a sks dog"), want);
    let enc = tok.encode_padded("a photo of a sks dog");
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(&enc.ids[..8], &want);
    assert!(enc.ids[8..].iter().all(|&i| i == 49407), "SD-1.x pads with <|endoftext|>: {:?}", enc.ids);
    assert_eq!((enc.n_tokens, enc.truncated), (8, false));
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (49406, 49407, 49407));
    assert_eq!((tok.model_max_length(), tok.vocab_size()), (77, 49408));
    assert_eq!(tok.token_to_id("dog</w>"), Some(1929));
    assert_eq!(tok.token_to_id("<|startoftext|>"), Some(49406));
    assert_eq!(tok.token_to_id("no-such-token"), None);
    assert_eq!(tok.id_to_token(48136).as_deref(), Some("sks</w>"));
    assert_eq!(tok.id_to_token(49408), None);
    assert_eq!(tok.id_to_token(-1), None);
}

/// tests/fixtures/tokenizer_cases.json: padded ids for the tiny-a (real vocab) and tiny-b
/// (1000-token BPE, pad "!") tokenizer folders.
#[test]
fn fixture_cases() {
    let path = fixtures().join("tokenizer_cases.json");
    assert!(path.is_file(), "{} is missing (made by scripts/make_fixtures.py)", path.display());
    let doc = read_json(&path);
    let folders = doc["cases"].as_object().expect("cases by folder");
    assert!(folders.len() >= 2);
    let (mut failures, mut total) = (Vec::new(), 0);
    for (folder, cases) in folders {
        let tok = ClipTokenizer::from_dir(&fixtures().join(folder)).expect("load fixture tokenizer");
        for case in cases.as_array().expect("case list") {
            total += 1;
            let want = ids_of(&case["ids"]);
            let got = tok.encode_padded(text_of(case)).ids;
            if got != want {
                failures.push(format!("{folder}: {:?}\n   got  {got:?}\n   want {want:?}", text_of(case)));
            }
        }
    }
    assert!(total >= 60, "only {total} cases");
    assert_no_failures(failures, total);
}

#[test]
fn tiny_b_pads_with_bang() {
    let dir = fixtures().join("tiny-b/tokenizer");
    let tok = ClipTokenizer::from_dir(&dir).expect("load tiny-b tokenizer");
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()), (998, 999, 0, 1000));
    // "!" is a special (added, not normalised) token there: matched anywhere as id 0.
    assert_eq!(tok.encode("wow!!"), tok.encode("wow ! !"));
    assert_eq!(tok.encode("!"), [998, 0, 999]);
    assert!(tok.encode_padded("a").ids[3..].iter().all(|&i| i == 0));
}

#[test]
fn extra_plain_cases() {
    let tok = clip();
    let doc = extra();
    let cases = doc["plain"].as_array().expect("plain cases");
    assert!(cases.len() >= 40);
    let failures: Vec<String> = cases.iter().filter_map(|c| check_case(&tok, c, "plain")).collect();
    assert_no_failures(failures, cases.len());
}

#[test]
fn normalizer_matches_tokenizers() {
    let doc = extra();
    let cases = doc["normalizer"].as_array().expect("normalizer cases");
    assert!(cases.len() > 100);
    let mut failures = Vec::new();
    for c in cases {
        let want = c["normalized"].as_str().expect("normalized text");
        let got = normalize(text_of(c));
        if got != want {
            let (g, w): (Vec<char>, Vec<char>) = (got.chars().collect(), want.chars().collect());
            let at = g.iter().zip(&w).position(|(a, b)| a != b).unwrap_or(g.len().min(w.len()));
            failures.push(format!(
                "normalize({:?}): first difference at char {at}: got {:?}, want {:?}",
                text_of(c).chars().take(40).collect::<String>(),
                &g[at.saturating_sub(2)..(at + 3).min(g.len())],
                &w[at.saturating_sub(2)..(at + 3).min(w.len())]
            ));
        }
    }
    assert_no_failures(failures, cases.len());
    // A few by hand.
    assert_eq!(normalize("Cafe\u{301}  \t X"), "caf\u{e9} x");
    assert_eq!(normalize("\u{1100}\u{1161}\u{11a8}"), "\u{ac01}");
    assert_eq!(normalize("a\u{301}\u{323}"), "\u{1ea1}\u{301}");
    assert_eq!(normalize("\u{212b}"), "\u{e5}");
}

#[test]
fn decode_is_readable() {
    let tok = clip();
    let doc = extra();
    let cases = doc["plain"].as_array().expect("plain cases");
    let mut failures = Vec::new();
    for c in cases {
        let want = c["decoded"].as_str().expect("decoded");
        let got = tok.decode(&ids_of(&c["ids"]));
        if got != want {
            failures.push(format!("decode of {:?}: got {got:?}, want {want:?}", text_of(c)));
        }
    }
    assert_no_failures(failures, cases.len());
}

#[test]
fn truncation_keeps_bos_and_eos() {
    let tok = clip();
    // "a" is one token: 75 of them fit exactly between bos and eos, 76 do not.
    let fits = "a ".repeat(75);
    let enc = tok.encode_padded(&fits);
    assert_eq!((enc.truncated, enc.n_tokens), (false, 77));
    assert_eq!(enc.ids, tok.encode(&fits));
    let long = "a ".repeat(76) + "dog";
    let enc = tok.encode_padded(&long);
    assert_eq!((enc.truncated, enc.n_tokens, enc.ids.len()), (true, 77, 77));
    assert_eq!(enc.ids[0], 49406);
    assert_eq!(enc.ids[76], 49407, "eos must stay at the end");
    assert!(enc.ids[1..76].iter().all(|&i| i == 320));
    assert_eq!(tok.encode(&long).len(), 79, "encode does not truncate");
}

#[test]
fn added_tokens_like_textual_inversion() {
    let mut tok = clip();
    let doc = extra();
    let added = &doc["added"];
    let tokens: Vec<&str> = added["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    // One by one, as diffusers' load_textual_inversion adds them.
    let mut ids = Vec::new();
    for t in &tokens {
        ids.extend(tok.add_tokens(&[t]).expect("add token"));
    }
    assert_eq!(ids, ids_of(&added["ids"]));
    assert_eq!(ids[0], 49408);
    assert_eq!(tok.vocab_size() as i64, added["vocab_size"].as_i64().unwrap());
    for (t, id) in tokens.iter().zip(&ids) {
        assert_eq!(tok.token_to_id(t), Some(*id));
        assert_eq!(tok.id_to_token(*id).as_deref(), Some(*t));
    }
    let cases = added["cases"].as_array().unwrap();
    let failures: Vec<String> = cases.iter().filter_map(|c| check_case(&tok, c, "added")).collect();
    assert_no_failures(failures, cases.len());

    // Refused: already in the vocabulary or already added; nothing is added then.
    let size = tok.vocab_size();
    for t in added["refused"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        let err = tok.add_tokens(&["<fresh>", t]).expect_err("existing token must be refused");
        assert!(format!("{err:#}").contains("already"), "{err:#}");
    }
    assert!(tok.add_tokens(&[""]).is_err());
    assert!(tok.add_tokens(&["<twice>", "<twice>"]).is_err());
    assert_eq!(tok.vocab_size(), size);
    assert_eq!(tok.token_to_id("<fresh>"), None);
    // Ids continue after the previous ones.
    assert_eq!(tok.add_tokens(&["<a1>", "<a2>"]).unwrap(), [size as i64, size as i64 + 1]);
}

#[test]
fn special_token_config_variants() {
    let doc = extra();
    let configs = doc["configs"].as_array().expect("configs");
    assert!(configs.len() >= 15);
    let (mut failures, mut total) = (Vec::new(), 0);
    for cfg in configs {
        let name = cfg["name"].as_str().unwrap();
        let dir = folder_with(&cfg["tokenizer_config"], &cfg["special_tokens_map"]);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let got = (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size() as i64, tok.model_max_length() as i64);
        let want = (
            cfg["bos_id"].as_i64().unwrap(),
            cfg["eos_id"].as_i64().unwrap(),
            cfg["pad_id"].as_i64().unwrap(),
            cfg["vocab_size"].as_i64().unwrap(),
            cfg["model_max_length"].as_i64().unwrap(),
        );
        total += 1;
        if got != want {
            failures.push(format!("{name}: (bos, eos, pad, vocab_size, max_len) = {got:?}, want {want:?}"));
        }
        let mut got_added: Vec<(String, i64, bool)> =
            tok.added_tokens().iter().map(|t| (t.content.clone(), t.id, t.normalized)).collect();
        let mut want_added: Vec<(String, i64, bool)> = cfg["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["content"].as_str().unwrap().to_string(),
                    t["id"].as_i64().unwrap(),
                    t["normalized"].as_bool().unwrap(),
                )
            })
            .collect();
        got_added.sort_by_key(|t| t.1);
        want_added.sort_by_key(|t| t.1);
        total += 1;
        if got_added != want_added {
            failures.push(format!("{name}: added tokens {got_added:?}, want {want_added:?}"));
        }
        for c in cfg["cases"].as_array().unwrap() {
            total += 1;
            failures.extend(check_case(&tok, c, name));
        }
    }
    assert_no_failures(failures, total);
}

#[test]
fn tokenizer_json_matches_vocab_merges() {
    let doc = extra();
    let small = &doc["small"];
    let root = fixtures().join("tokenizers/clip-small-json");
    let vm = ClipTokenizer::from_dir(&root.join("vocab-merges")).expect("small vocab+merges");
    let tj = ClipTokenizer::from_dir(&root.join("tokenizer-json")).expect("small tokenizer.json");
    assert_eq!((vm.vocab_size(), tj.vocab_size()), (602, 603));
    assert_eq!(tj.token_to_id("<cat-toy>"), Some(602));
    assert_eq!((tj.bos_id(), tj.eos_id(), tj.pad_id(), tj.model_max_length()), (600, 601, 601, 77));
    let (mut failures, mut total) = (Vec::new(), 0);
    for (tok, key) in [(&vm, "vocab-merges"), (&tj, "tokenizer-json")] {
        for c in small[key].as_array().unwrap() {
            total += 1;
            failures.extend(check_case(tok, c, key));
        }
    }
    assert_no_failures(failures, total);
    for text in ["a photo of a sks dog", "the thing in the other thing", "Thin THE THREE café 123"] {
        assert_eq!(vm.encode(text), tj.encode(text), "{text:?}");
    }
    assert_ne!(vm.encode("<cat-toy>"), tj.encode("<cat-toy>"));

    // Older tokenizer.json files write merges as "a b" strings.
    let mut j = read_json(&root.join("tokenizer-json/tokenizer.json"));
    let merges = j["model"]["merges"].as_array().unwrap().clone();
    assert!(merges[0].is_array());
    j["model"]["merges"] = merges
        .iter()
        .map(|m| Value::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), j.to_string()).unwrap();
    let old = ClipTokenizer::from_dir(dir.path()).expect("string merges");
    for c in small["tokenizer-json"].as_array().unwrap() {
        assert_eq!(old.encode(text_of(c)), ids_of(&c["ids"]), "{:?}", text_of(c));
    }
}

#[test]
fn tokenizer_json_is_preferred_over_vocab_merges() {
    let root = fixtures().join("tokenizers/clip-small-json");
    let dir = tempfile::tempdir().unwrap();
    // A real 49408 vocab next to the small tokenizer.json: the tokenizer.json one is used.
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(clip_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(root.join("tokenizer-json/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 603);
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let err = load_err(p);
    assert!(err.contains("vocab.json"), "{err}");

    let small = fixtures().join("tokenizers/clip-small-json/vocab-merges");
    std::fs::copy(small.join("vocab.json"), p.join("vocab.json")).unwrap();
    let err = load_err(p);
    assert!(err.contains("merges.txt"), "{err}");

    let good = std::fs::read_to_string(small.join("merges.txt")).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines[3] = "abc";
    std::fs::write(p.join("merges.txt"), lines.join("\n")).unwrap();
    let err = load_err(p);
    assert!(err.contains("merges.txt") && err.contains("line 4") && err.contains("abc"), "{err}");

    std::fs::write(p.join("merges.txt"), format!("{good}\nx y\n")).unwrap();
    let err = load_err(p);
    assert!(err.contains("merges.txt") && err.contains("malformed"), "blank line: {err}");

    std::fs::write(p.join("merges.txt"), good.replace("i n\n", "i zz\n")).unwrap();
    let err = load_err(p);
    assert!(err.contains("merges.txt") && err.contains("\"zz\"") && err.contains("vocabulary"), "{err}");

    std::fs::write(p.join("merges.txt"), &good).unwrap();
    std::fs::write(p.join("vocab.json"), "{\"a\": 1,").unwrap();
    let err = load_err(p);
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::write(p.join("vocab.json"), "{\"a\": -1}").unwrap();
    let err = load_err(p);
    assert!(err.contains("vocab.json") && err.contains("\"a\""), "{err}");

    std::fs::copy(small.join("vocab.json"), p.join("vocab.json")).unwrap();
    ClipTokenizer::from_dir(p).expect("valid again");
    std::fs::write(p.join("tokenizer_config.json"), "{\"model_max_length\": 1}").unwrap();
    let err = load_err(p);
    assert!(err.contains("tokenizer_config.json") && err.contains("model_max_length"), "{err}");
    std::fs::write(p.join("tokenizer_config.json"), "{\"bos_token\": 3}").unwrap();
    let err = load_err(p);
    assert!(err.contains("tokenizer_config.json") && err.contains("bos_token"), "{err}");
    std::fs::write(p.join("tokenizer_config.json"), "{\"model_max_length\": 1e30}").unwrap();
    assert_eq!(ClipTokenizer::from_dir(p).unwrap().model_max_length(), 77);
    std::fs::remove_file(p.join("tokenizer_config.json")).unwrap();
    assert_eq!(ClipTokenizer::from_dir(p).unwrap().model_max_length(), 77);

    std::fs::write(p.join("tokenizer.json"), "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}").unwrap();
    let err = load_err(p);
    assert!(err.contains("tokenizer.json") && err.contains("BPE"), "{err}");

    let err = load_err(&p.join("nope"));
    assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
}

#[test]
fn loads_fast_and_caches() {
    let t = Instant::now();
    let tok = clip();
    let load = t.elapsed();
    let text = "a photo of a sks dog, highly detailed, 8k, trending on artstation";
    let first = tok.encode(text);
    let t = Instant::now();
    for _ in 0..1000 {
        assert_eq!(tok.encode(text), first);
    }
    let per = t.elapsed() / 1000;
    eprintln!("load {load:?}, cached encode {per:?}");
    // Generous bounds: this also runs unoptimised.
    assert!(load.as_secs_f64() < 3.0, "loading took {load:?}");
    assert!(per.as_secs_f64() < 0.005, "encode took {per:?}");
    // Clones share nothing mutable and agree.
    assert_eq!(tok.clone().encode(text), first);
}
