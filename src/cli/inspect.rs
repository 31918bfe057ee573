//! `brigade inspect`: model metadata, tensors and memory use.

use std::sync::Arc;

use anyhow::Result;
use clap::Args;

use brigade::gguf::GgufFile;
use brigade::model::kv::KvStore;
use brigade::model::Model;

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct InspectArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    m: ModelArgs,
}

/// Prints the file's metadata and tensor table and the model's memory use.
/// A file that parses but that the model loader refuses (a tensor type without
/// a kernel, an unknown architecture) is still listed, with the loader's reason
/// instead of the memory figures.
pub(crate) fn run(a: InspectArgs) -> Result<()> {
    let cfg = super::load_config(a.m.config.as_deref())?;
    let path = super::model_path(&a.m, &cfg)?;
    let file = Arc::new(GgufFile::open(&path)?);
    let model = match Model::from_gguf(file.clone()) {
        Ok(m) => m,
        Err(e) => return list_unloadable(&a, &path, &file, &e),
    };
    let kv_per_token = KvStore::bytes_per_token(model.config.n_layers, model.config.kv_dim);
    if a.json {
        let tensors = tensor_json(&file);
        let v = serde_json::json!({
            "path": path.display().to_string(),
            "version": file.version(),
            "runnable": true,
            "config": model.config,
            "weight_bytes": model.weight_bytes(),
            "file_bytes": file.data_bytes(),
            "kv_bytes_per_token": kv_per_token,
            "tensors": tensors,
        });
        println!("{v}");
        return Ok(());
    }
    print_file(&path, &file);
    let c = &model.config;
    print_config(c);
    let mib = (1 << 20) as f64;
    println!("memory:");
    println!(
        "  weights (mmapped): {:.1} MiB",
        model.weight_bytes() as f64 / mib
    );
    println!(
        "  kv cache per token (f16): {} bytes ({:.1} MiB per 1k tokens)",
        kv_per_token,
        kv_per_token as f64 * 1024.0 / mib
    );
    println!("  context length: {}", c.context_length);
    Ok(())
}

fn tensor_json(file: &GgufFile) -> Vec<serde_json::Value> {
    file.tensors()
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "dims": t.dims, "dtype": t.dtype.name(), "bytes": t.size_bytes}))
        .collect()
}

/// The file line, the metadata and the tensor table.
fn print_file(path: &std::path::Path, file: &GgufFile) {
    println!(
        "file: {} (GGUF v{}, {} bytes)",
        path.display(),
        file.version(),
        file.data_bytes()
    );
    println!("metadata:");
    for (k, v) in file.metadata() {
        let s = match v.as_array() {
            Some(a) => format!("[{} values]", a.len()),
            None => format!("{v:?}"),
        };
        let s: String = s.chars().take(100).collect();
        println!("  {k} = {s}");
    }
    print_tensors(file);
}

/// The hyper-parameters the model runs with (after defaults).
fn print_config(c: &brigade::model::ModelConfig) {
    let opt = |v: Option<f32>| v.map_or("none".to_string(), |x| x.to_string());
    println!("model:");
    println!("  architecture: {} ({})", c.arch.name(), c.name);
    println!(
        "  layers {}, dim {}, ffn {} ({:?}), vocab {}",
        c.n_layers, c.dim, c.ffn_dim, c.ffn_act, c.vocab_size
    );
    println!(
        "  heads {} (kv {}), head_dim {}, attention scale {}",
        c.n_heads, c.n_kv_heads, c.head_dim, c.attn_scale
    );
    println!(
        "  rope {:?}: dim {}, base {} (sliding layers {}), freq scale {}, attn factor {}, factors {}",
        c.rope_style,
        c.rope_dim,
        c.rope_theta,
        c.rope_theta_swa,
        c.rope_freq_scale,
        c.rope_attn_factor,
        c.rope_factors.as_deref().unwrap_or("none")
    );
    let swa: String = c
        .swa_layers
        .iter()
        .map(|&s| if s { 'S' } else { 'G' })
        .collect();
    match c.sliding_window {
        Some(w) => println!("  sliding window {w} on layers {swa} (S = sliding, G = global)"),
        None => println!("  sliding window: none"),
    }
    println!(
        "  soft-caps: attention {}, final {}; embedding scale {}",
        opt(c.attn_softcap),
        opt(c.final_softcap),
        opt(c.embed_scale)
    );
    println!("  rms eps {}", c.rms_eps);
}

fn print_tensors(file: &GgufFile) {
    println!("tensors ({}):", file.tensors().len());
    for t in file.tensors() {
        println!(
            "  {:<32} {:>6} {:?} {} bytes",
            t.name,
            t.dtype.name(),
            t.dims,
            t.size_bytes
        );
    }
}

/// The listing of a file the model loader refuses: its tensors and the reason.
fn list_unloadable(
    a: &InspectArgs,
    path: &std::path::Path,
    file: &GgufFile,
    e: &brigade::model::ModelError,
) -> Result<()> {
    if a.json {
        let v = serde_json::json!({
            "path": path.display().to_string(),
            "version": file.version(),
            "file_bytes": file.data_bytes(),
            "runnable": false,
            "error": e.to_string(),
            "tensors": tensor_json(file),
        });
        println!("{v}");
        return Ok(());
    }
    print_file(path, file);
    println!("model: cannot run: {e}");
    Ok(())
}
