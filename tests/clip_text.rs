//! CLIP text encoder: parity with transformers 5.24 on the tiny fixtures, the embedding split,
//! causality, grown vocabularies and strict loading.

use hifi_tuner::models::clip_text::{ClipTextModel, POSITION_IDS_KEY, TOKEN_EMBEDDING_KEY};
use tch::{Device, Kind, Tensor};

mod common;

use common::{check_tol, fixtures, reference_tensor as reference};

fn load(name: &str) -> ClipTextModel {
    ClipTextModel::load(&fixtures().join(name).join("text_encoder"), Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// max |a - b| / max |b|
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let num = (a - b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]).max(1e-12);
    num / den
}

fn check_parity(name: &str, act: &str) {
    let model = load(name);
    assert_eq!(model.config.hidden_act, act, "{name} should exercise {act}");
    let ids = reference(name, "text.input_ids");
    let want = reference(name, "text.last_hidden_state").to_kind(Kind::Float);
    let got = tch::no_grad(|| model.forward(&ids));
    let rel = rel_diff(&got, &want);
    println!("{name} ({act}): max relative diff {rel:.3e}");
    check_tol(name, rel, 1e-4);
}

#[test]
fn parity_quick_gelu_tiny_a() {
    check_parity("tiny-a", "quick_gelu");
}

#[test]
fn parity_gelu_tiny_b() {
    check_parity("tiny-b", "gelu");
}

#[test]
fn forward_equals_forward_embeds_of_token_embedding() {
    let model = load("tiny-b");
    let ids = reference("tiny-b", "text.input_ids");
    let a = tch::no_grad(|| model.forward(&ids));
    let b = tch::no_grad(|| model.forward_embeds(&model.token_embedding(&ids)));
    assert!(a.equal(&b), "forward(ids) and forward_embeds(token_embedding(ids)) differ");
}

#[test]
fn causal_later_tokens_do_not_change_earlier_rows() {
    let model = load("tiny-b");
    let ids = reference("tiny-b", "text.input_ids").narrow(0, 0, 1).copy(); // (1, 77)
    let base = tch::no_grad(|| model.forward(&ids));
    let vocab = model.vocab_size();
    for k in [1i64, 10, 40, 76] {
        let changed = ids.copy();
        let old = changed.int64_value(&[0, k]);
        let _ = changed.narrow(1, k, 1).fill_((old + 1) % vocab);
        let out = tch::no_grad(|| model.forward(&changed));
        assert!(out.narrow(1, 0, k).equal(&base.narrow(1, 0, k)), "changing token {k} changed an earlier row");
        // The change is visible at row k itself, so the check above can fail.
        let at_k = (out.narrow(1, k, 1) - base.narrow(1, k, 1)).abs().max().double_value(&[]);
        assert!(at_k > 0.0, "changing token {k} did not change row {k}");
    }
}

#[test]
fn gradients_flow_to_input_embeddings() {
    let model = load("tiny-b");
    let ids = reference("tiny-b", "text.input_ids");
    let embeds = tch::no_grad(|| model.token_embedding(&ids)).set_requires_grad(true);
    let out = model.forward_embeds(&embeds);
    out.square().sum(Kind::Float).backward();
    let grad = embeds.grad();
    assert!(grad.defined(), "no gradient on input embeddings");
    assert!(grad.abs().max().double_value(&[]) > 0.0, "zero gradient on input embeddings");
}

#[test]
fn appended_embeddings_are_used_for_new_ids() {
    let mut model = load("tiny-b");
    let ids = reference("tiny-b", "text.input_ids").narrow(0, 0, 1).copy();
    let before = tch::no_grad(|| model.forward(&ids));
    let old_vocab = model.vocab_size();
    let trainable_before = model.vs.trainable_variables().len();
    let d = model.hidden_size();
    let rows = Tensor::randn([2, d], (Kind::Float, Device::Cpu));

    let new_ids = model.append_token_embeddings(&rows).expect("append");
    assert_eq!(new_ids, vec![old_vocab, old_vocab + 1]);
    assert_eq!(model.vocab_size(), old_vocab + 2);

    // The VarStore holds the grown matrix, under the same name, still trainable, once.
    let vars = model.vs.variables();
    assert_eq!(vars[TOKEN_EMBEDDING_KEY].size(), vec![old_vocab + 2, d]);
    assert_eq!(model.vs.trainable_variables().len(), trainable_before);
    assert!(model.vs.trainable_variables().iter().any(|t| t.size() == vec![old_vocab + 2, d]));

    // Old ids are unaffected.
    let after = tch::no_grad(|| model.forward(&ids));
    assert!(after.equal(&before), "old ids changed after appending rows");

    // A new id looks up the new row.
    let with_new = ids.copy();
    let _ = with_new.narrow(1, 5, 1).fill_(old_vocab + 1);
    let emb = tch::no_grad(|| model.token_embedding(&with_new));
    assert!(emb.get(0).get(5).equal(&rows.get(1)), "new id does not use the appended row");
    let expected = tch::no_grad(|| model.forward_embeds(&emb));
    let got = tch::no_grad(|| model.forward(&with_new));
    assert!(got.equal(&expected));
    assert!(!got.equal(&before), "new token did not change the output");

    // Ids beyond the grown vocabulary are refused, not read out of bounds.
    let bad = ids.copy();
    let _ = bad.narrow(1, 3, 1).fill_(old_vocab + 2);
    let err = model.f_forward(&bad).expect_err("out-of-range id accepted");
    assert!(format!("{err:#}").contains("out of range"), "{err:#}");
}

/// Copies tiny-b's text_encoder into a temp dir with its weights rewritten by `edit`.
fn edited_copy(edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> tempfile::TempDir {
    let src = fixtures().join("tiny-b/text_encoder");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let weights = hifi_tuner::load::weight_file(&src).unwrap();
    let mut tensors = Tensor::read_safetensors(&weights).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn strip(k: &str) -> &str {
    k.strip_prefix("text_model.").unwrap_or(k)
}

#[test]
fn missing_key_is_named() {
    let dir = edited_copy(|t| t.retain(|(k, _)| strip(k) != "encoder.layers.1.mlp.fc2.bias"));
    let err = ClipTextModel::load(dir.path(), Device::Cpu).expect_err("missing key accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("missing") && msg.contains("encoder.layers.1.mlp.fc2.bias"), "{msg}");
}

#[test]
fn unused_key_is_named() {
    let dir = edited_copy(|t| {
        t.push(("text_model.encoder.layers.0.extra.weight".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu))))
    });
    let err = ClipTextModel::load(dir.path(), Device::Cpu).expect_err("unused key accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("unused") && msg.contains("encoder.layers.0.extra.weight"), "{msg}");
}

#[test]
fn prefixed_keys_and_position_ids_buffer_are_accepted() {
    let dir = edited_copy(|t| {
        for (k, _) in t.iter_mut() {
            if !k.starts_with("text_model.") {
                *k = format!("text_model.{k}");
            }
        }
        t.retain(|(k, _)| k != POSITION_IDS_KEY);
        t.push((POSITION_IDS_KEY.into(), Tensor::arange(77, (Kind::Int64, Device::Cpu)).unsqueeze(0)));
    });
    let model = ClipTextModel::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{e:#}"));
    let reference_model = load("tiny-b");
    let ids = reference("tiny-b", "text.input_ids");
    let a = tch::no_grad(|| model.forward(&ids));
    let b = tch::no_grad(|| reference_model.forward(&ids));
    assert!(a.equal(&b));
}

#[test]
fn unsupported_activation_names_the_key() {
    let src = fixtures().join("tiny-b/text_encoder");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_act"] = "relu".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(hifi_tuner::load::weight_file(&src).unwrap(), dir.path().join("model.safetensors")).unwrap();
    let err = ClipTextModel::load(dir.path(), Device::Cpu).expect_err("relu accepted");
    let msg = format!("{err:#}");
    assert!(msg.contains("hidden_act") && msg.contains("config.json"), "{msg}");
}
