use anyhow::Result;
use hifi_tuner::pipeline::load_tokenizer;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers model folder (its tokenizer/ is used), a tokenizer folder, a single-file
    /// checkpoint (the built-in SD-1.x tokenizer, or --config's) or a Hugging Face id.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    model_options: super::ModelOptions,
    /// The text to tokenize.
    text: String,
}

pub fn run(a: Args) -> Result<()> {
    let tok = load_tokenizer(&a.model, &a.model_options.options(tch::Device::Cpu)?)?;
    let enc = tok.encode_padded(&a.text);
    if enc.truncated {
        eprintln!("warning: the text is {} tokens long and was truncated to {}", enc.n_tokens, tok.model_max_length());
    }
    println!("{}", serde_json::to_string(&enc.ids)?);
    Ok(())
}
