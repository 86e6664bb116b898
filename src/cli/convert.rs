//! `convert`, `verify` and `synth`: writing and checking the flash layout.

use super::args::*;
use anyhow::{Context, Result, bail};
use flashmoe::flash::Manifest;
use flashmoe::flash::convert::{ConvertOptions, convert};
use flashmoe::load::{LoadOptions, load_model_with};
use std::path::PathBuf;

pub(crate) fn cmd_convert(
    from: PathBuf,
    to: PathBuf,
    experts: &str,
    dense: &str,
    group: Option<u16>,
    force: bool,
) -> Result<()> {
    if group == Some(0) {
        bail!("--group-size must be positive");
    }
    // experts already quantized at the asked bit width keep their own group (and so their bytes)
    let expert_group = match (group, flashmoe::flash::convert::source_expert_kind(&from).ok().flatten()) {
        (Some(g), _) => g,
        (None, Some(flashmoe::tensor::WKind::Q { bits, group })) if experts == format!("q{bits}") => group,
        (None, _) => 64,
    };
    let experts = if experts == "keep" {
        // the source's own expert format (a GGUF's ggml blocks, copied)
        match flashmoe::flash::convert::source_expert_kind(&from)? {
            Some(k) => k,
            None => bail!("--experts keep: {} has no MoE layers", from.display()),
        }
    } else {
        parse_kind(experts, expert_group, "experts")?
    };
    let opts = ConvertOptions {
        experts,
        dense: parse_kind(dense, group.unwrap_or(64), "dense")?,
        force,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t = std::time::Instant::now();
    let r = convert(&from, &to, &opts)?;
    eprintln!(
        "converted {} -> {} in {:.1}s: {} resident tensors ({:.2} MB), {} experts ({:.2} MB, {} bytes each)",
        from.display(),
        to.display(),
        t.elapsed().as_secs_f64(),
        r.tensors,
        r.resident_bytes as f64 / 1e6,
        r.experts,
        r.expert_bytes as f64 / 1e6,
        r.expert_stride
    );
    Ok(())
}

pub(crate) fn cmd_verify(dir: PathBuf) -> Result<()> {
    let m = Manifest::load(&dir)?;
    let total: u64 = m.files.iter().map(|f| f.bytes).sum();
    let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = m.verify(&dir, |b| pb.inc(b))?;
    pb.finish_and_clear();
    // intact files can still describe a model that does not load (config, shapes)
    super::args::loading(&dir, || load_model_with(&dir, &LoadOptions::default()))
        .context("the checksums match, but the model does not load")?;
    println!("ok: {} files, {:.2} MB, every checksum matches", m.files.len(), n as f64 / 1e6);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cmd_synth(
    preset: &str,
    layers: Option<usize>,
    experts: &str,
    dense: &str,
    routing: flashmoe::flash::synth::Routing,
    seed: u64,
    to: &std::path::Path,
    force: bool,
) -> Result<()> {
    let opts = flashmoe::flash::synth::SynthOptions {
        experts: parse_kind(experts, 64, "experts")?,
        dense: parse_kind(dense, 64, "dense")?,
        routing,
        layers,
        seed,
        force,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let t = std::time::Instant::now();
    let r = flashmoe::flash::synth::synth(preset, to, &opts)?;
    eprintln!(
        "wrote {} ({} layers) to {} in {:.1}s: resident {:.2} GB, experts {:.2} GB ({} bytes each)",
        preset,
        r.layers,
        to.display(),
        t.elapsed().as_secs_f64(),
        r.resident_bytes as f64 / 1e9,
        r.expert_bytes as f64 / 1e9,
        r.expert_stride
    );
    Ok(())
}
