//! `engram info`: what a model file is, without loading its weights.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use engram::model::ModelFiles;

#[derive(Args)]
pub struct InfoArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let files = ModelFiles::open(&args.model)?;
    let c = &files.config;
    println!("model          {}", files.path.display());
    println!("format         {:?}", files.format);
    println!("architecture   {} ({})", c.architecture.model_type(), c.architecture.hf_class());
    println!("layers         {}", c.num_hidden_layers);
    println!("hidden         {}", c.hidden_size);
    println!("ffn            {}", c.intermediate_size);
    println!("heads          {} (kv {}, head_dim {})", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    println!("vocab          {}", c.vocab_size);
    println!("context        {}", c.max_position_embeddings);
    println!("rope theta     {}{}", c.rope_theta, if c.rope_scaling.is_some() { " (llama3 scaling)" } else { "" });
    println!("rms eps        {}", c.rms_norm_eps);
    println!("tied embedding {}", c.tie_word_embeddings);
    println!("qkv bias       {}", c.attention_bias);
    println!("qk norm        {}", c.qk_norm);
    let names = files.source.tensor_names();
    let mut types: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut parameters = 0usize;
    for name in &names {
        let count: usize = files.source.shape(name)?.iter().product();
        parameters += count;
        let entry = types.entry(files.source.stored_type(name)?).or_default();
        entry.0 += 1;
        entry.1 += count;
    }
    println!("tensors        {} ({:.1}M parameters)", names.len(), parameters as f64 / 1e6);
    for (ty, (n, count)) in &types {
        println!("  {ty:<12} {n} tensors, {:.1}M parameters", *count as f64 / 1e6);
    }
    let t = &files.tokenizer;
    println!("tokenizer      {} tokens, bos {:?}, eos {:?}, add_bos {}", t.vocab_size(), t.bos_token, t.eos_token, t.add_bos);
    println!("eos ids        {:?}", files.eos_ids);
    match &files.chat_template {
        Some(template) => println!("chat template  {} characters: {}", template.source.len(), template.source.lines().next().unwrap_or("").chars().take(80).collect::<String>()),
        None => println!("chat template  none"),
    }
    print_devices();
    Ok(())
}

/// The CUDA devices `--device cuda:N` can name, or why there are none.
fn print_devices() {
    match engram::backend::cuda::device::device_count() {
        Ok(count) => {
            for ordinal in 0..count {
                match engram::backend::cuda::usable(ordinal) {
                    Ok(info) => println!("gpu            {info}"),
                    Err(reason) => println!("gpu            cuda:{ordinal} unusable: {reason}"),
                }
            }
        }
        Err(reason) => println!("gpu            none: {reason}"),
    }
}
