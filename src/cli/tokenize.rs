use anyhow::Result;
use hifi_tuner::load::ModelDir;
use hifi_tuner::tokenizer::ClipTokenizer;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers model folder (its tokenizer/ is used) or a tokenizer folder.
    #[arg(long)]
    model: PathBuf,
    /// The text to tokenize.
    text: String,
}

pub fn run(a: Args) -> Result<()> {
    let dir = if a.model.join("tokenizer").is_dir() {
        ModelDir::open(&a.model)?.component("tokenizer")
    } else {
        a.model.clone()
    };
    let tok = ClipTokenizer::from_dir(&dir)?;
    let enc = tok.encode_padded(&a.text);
    if enc.truncated {
        eprintln!("warning: the text is {} tokens long and was truncated to {}", enc.n_tokens, tok.model_max_length());
    }
    println!("{}", serde_json::to_string(&enc.ids)?);
    Ok(())
}
