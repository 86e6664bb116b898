//! Where a model's forward pass runs. The CPU path is the layers' own code (`layers/`, on the
//! kernels in `kernels/`); an accelerator takes the whole pass: it uploads the layers' weights
//! once and computes every block itself, so a GPU keeps activations and caches in its memory
//! and never returns to the host between layers (see docs/ARCHITECTURE.md for why the seam is a
//! whole forward pass rather than one call per operation).

use crate::model::{Model, State};
use anyhow::{Result, bail};
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub mod cuda;

/// A device choice as the user states it (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when this build has it and a GPU is present, else the CPU (the CLI's default).
    Auto,
    /// The library's default.
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Device> {
        Ok(match s {
            "auto" => Device::Auto,
            "cpu" => Device::Cpu,
            "cuda" | "gpu" => Device::Cuda(0),
            _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Device::Cuda(n),
                None => bail!("--device must be auto, cpu, cuda or cuda:N, got `{s}`"),
            },
        })
    }
}

/// Runs a model's whole forward pass on a device of its own.
pub trait Accelerator: Send + Sync {
    /// The device, in words (`CUDA 0: NVIDIA H100 80GB HBM3`).
    fn name(&self) -> String;
    /// [`Model::forward`] on the device; `st.device` carries the device-side state.
    fn forward(&self, model: &Model, st: &mut State, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>>;
}

/// Sequence state that lives on a device (KV caches in GPU memory).
pub trait DeviceState: Send + Sync + std::fmt::Debug {
    fn clone_box(&self) -> Box<dyn DeviceState>;
    fn bytes(&self) -> usize;
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

impl Clone for Box<dyn DeviceState> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// The accelerator for `device`, or `None` for the CPU. `Auto` picks CUDA when this build has it,
/// a device answers and the model fits (else the CPU, with a note on stderr); an explicit `Cuda`
/// that cannot be had is an error saying why.
pub fn attach(model: &Model, device: Device) -> Result<Option<Arc<dyn Accelerator>>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Auto => {
            // the GPU when it can take the model; else the CPU, saying why
            #[cfg(feature = "cuda")]
            if cuda::available() {
                match cuda::supports(model).and_then(|_| cuda::CudaModel::upload(model, 0)) {
                    Ok(m) => return Ok(Some(Arc::new(m))),
                    Err(e) => eprintln!("note: running on the CPU: {e:#}"),
                }
            }
            let _ = model;
            Ok(None)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(Some(Arc::new(cuda::CudaModel::upload(model, n)?))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!(
            "this flashmoe was built without CUDA: rebuild with `cargo build --release --features cuda`, or use --device cpu"
        ),
    }
}
