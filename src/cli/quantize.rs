//! `engram quantize`: a GGUF file re-encoded with Q8_0, Q4_0, Q4_1, Q5_0, Q4_K or Q6_K (or
//! f16/bf16/f32) matrices.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::model::quant::GgmlType;

#[derive(Args)]
pub struct QuantizeArgs {
    /// The .gguf file to read (any type engram decodes: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q4_k, q6_k).
    input: PathBuf,
    /// The .gguf file to write.
    output: PathBuf,
    /// Type of the weight matrices: q8_0, q4_0, q4_1, q5_0, q4_k, q6_k, f16, bf16 or f32 (a K type
    /// needs rows of whole 256-value super-blocks; other matrices get q8_0).
    #[arg(long = "type")]
    matrix_type: String,
    /// Type of the token embedding / output projection (default: q8_0 for the 4-bit types, as
    /// llama.cpp keeps them at higher precision; otherwise the --type).
    #[arg(long)]
    embedding_type: Option<String>,
}

fn parse_type(text: &str) -> Result<GgmlType> {
    match GgmlType::from_name(&text.to_ascii_uppercase()) {
        // Every type engram decodes it also writes.
        Some(ty) if ty.can_dequantize() => Ok(ty),
        _ => bail!("unknown or unsupported type '{text}' (expected q8_0, q4_0, q4_1, q5_0, q4_k, q6_k, f16, bf16 or f32)"),
    }
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.input.is_dir() {
        bail!(
            "{}: engram quantize reads GGUF files; convert a Hugging Face directory to GGUF first (llama.cpp's convert_hf_to_gguf.py --outtype f16)",
            args.input.display()
        );
    }
    let matrix_type = parse_type(&args.matrix_type)?;
    let embedding_type = match &args.embedding_type {
        Some(text) => parse_type(text)?,
        None if matches!(matrix_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0) => GgmlType::Q8_0,
        // llama.cpp's Q4_K_M/S keep the output projection in Q6_K.
        None if matrix_type == GgmlType::Q4_K => GgmlType::Q6_K,
        None => matrix_type,
    };
    let progress = indicatif::ProgressBar::new(0);
    progress.set_style(indicatif::ProgressStyle::with_template("quantizing [{bar:30}] {pos}/{len} tensors").expect("valid template"));
    let summary = engram::model::quantize::quantize_gguf(&args.input, &args.output, matrix_type, embedding_type, |done, total| {
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    })
    .with_context(|| format!("quantizing {} to {}", args.input.display(), args.output.display()))?;
    progress.finish_and_clear();
    eprintln!(
        "wrote {}: {} tensors re-encoded ({} matrices, {} embedding/output), {} kept; {:.1} MB -> {:.1} MB",
        args.output.display(),
        summary.converted.len(),
        matrix_type,
        embedding_type,
        summary.kept.len(),
        summary.bytes_in as f64 / 1e6,
        summary.bytes_out as f64 / 1e6
    );
    let requantized = summary.converted.iter().filter(|(_, from, _)| !matches!(from, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)).count();
    if requantized > 0 {
        eprintln!("note: {requantized} tensors were already block-quantized; their decoded values were quantized again (errors add up)");
    }
    Ok(())
}
