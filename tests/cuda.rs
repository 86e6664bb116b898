//! The CUDA backend against the scalar reference (kernels) and the float64 `transformers`
//! reference (whole models). Built with `--features cuda`; `scripts/test_cuda.sh` runs them on a
//! GPU machine with FLASHMOE_REQUIRE_CUDA=1, where a missing device is a failure. Elsewhere
//! each test says it was not run.
#![cfg(feature = "cuda")]

use flashmoe::backend::{Device, cuda};
use flashmoe::generate::{Sampler, SamplingParams, generate};
use flashmoe::load::{LoadOptions, load_model, load_model_with};
use flashmoe::model::Model;
use flashmoe::tensor::{Mat, Precision, WKind};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FIXTURES: &[&str] = &["qwen3_moe", "qwen3_moe_norm", "qwen35_text", "qwen35_fused", "qwen35_vl", "qwen3_next"];
/// f32 accumulation in another order than the CPU's: the bound.
const TOL: f64 = 1e-3;

fn gpu() -> bool {
    if cuda::available() {
        return true;
    }
    assert!(std::env::var("FLASHMOE_REQUIRE_CUDA").is_err(), "FLASHMOE_REQUIRE_CUDA is set but no CUDA device answers");
    eprintln!("no CUDA device: not run");
    false
}

/// The fixtures; FLASHMOE_FIXTURES points a test binary carried to another machine at them.
fn dir(name: &str) -> PathBuf {
    let root = std::env::var_os("FLASHMOE_FIXTURES").map(PathBuf::from);
    root.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")).join(name)
}

/// A fixture on the GPU with f32 inputs to every product, as the reference computes.
fn on_cuda(name: &str) -> Model {
    let o = LoadOptions { device: Device::Cuda(0), precision: Precision::Exact, ..Default::default() };
    let mut m = load_model_with(&dir(name), &o).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    m.opts.precision = Precision::Exact;
    assert!(m.accel.is_some(), "{name}: not on the GPU");
    m
}

fn on_cpu(name: &str) -> Model {
    let mut m = load_model(&dir(name)).unwrap();
    m.opts.precision = Precision::Exact;
    m
}

struct Reference {
    prompt: Vec<u32>,
    prefill: Vec<Vec<f64>>,
    greedy: Vec<u32>,
    decode: Vec<Vec<f64>>,
}

fn reference(name: &str) -> Reference {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir(name).join("reference.json")).unwrap()).unwrap();
    let ids = |k: &str| v[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let rows = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
            .collect::<Vec<Vec<f64>>>()
    };
    Reference {
        prompt: ids("prompt"),
        prefill: rows("prefill_logits"),
        greedy: ids("greedy"),
        decode: rows("decode_logits"),
    }
}

/// max |a − b| / max |b|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    want.iter().zip(got).fold(0.0f64, |m, (w, g)| m.max((w - *g as f64).abs())) / scale
}

/// (top-1 agreement, mean KL(reference ‖ got)) over rows of logits.
fn agreement(got: &[f32], want: &[Vec<f64>]) -> (f64, f64) {
    let v = want[0].len();
    let lsm = |r: &[f64]| {
        let m = r.iter().cloned().fold(f64::MIN, f64::max);
        let z = r.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
        r.iter().map(|x| x - z).collect::<Vec<_>>()
    };
    let argmax = |r: &[f64]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
    let (mut top, mut kl) = (0.0, 0.0);
    for (t, w) in want.iter().enumerate() {
        let g: Vec<f64> = got[t * v..(t + 1) * v].iter().map(|x| *x as f64).collect();
        top += (argmax(w) == argmax(&g)) as u8 as f64;
        let (p, q) = (lsm(w), lsm(&g));
        kl += p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
    }
    (top / want.len() as f64, kl / want.len() as f64)
}

fn rng(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

#[test]
fn matmul_kernel_matches_scalar_reference() {
    if !gpu() {
        return;
    }
    let kinds = [
        WKind::F32,
        WKind::BF16,
        WKind::F16,
        WKind::Q { bits: 2, group: 32 },
        WKind::Q { bits: 2, group: 64 },
        WKind::Q { bits: 3, group: 64 },
        WKind::Q { bits: 4, group: 32 },
        WKind::Q { bits: 4, group: 64 },
        WKind::Q { bits: 4, group: 128 },
        WKind::Q { bits: 8, group: 64 },
    ];
    // odd sizes and tails: rows not a multiple of a block's 8 warps, columns off the 16-byte
    // loads and off the group size, token counts around the 8-token tile
    let shapes = [(1, 64), (37, 96), (5, 100), (130, 256), (64, 2048), (3, 1000)];
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for kind in kinds {
        for (rows, cols) in shapes {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed)).collect();
            let m = Mat::from_f32(rows, cols, w).unwrap().to_kind(kind);
            for n in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng(&mut seed)).collect();
                let got = cuda::matmul_once(0, &m.view(), &x, n, false).unwrap();
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.row_f32(r, &mut row);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let want: f64 = row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let g = got[t * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * mag.max(1e-3),
                            "{} {rows}x{cols}, {n} tokens, row {r} token {t}: {g} vs {want}",
                            kind.name()
                        );
                    }
                }
            }
        }
    }
}

/// Decode's integer kernel (int8 inputs, a scale per 32) on q4/q8 rows: within the input
/// rounding's bound of the exact product.
#[test]
fn int8_input_matvec_stays_within_its_rounding() {
    if !gpu() {
        return;
    }
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for kind in [WKind::Q { bits: 4, group: 32 }, WKind::Q { bits: 4, group: 64 }, WKind::Q { bits: 8, group: 64 }] {
        for (rows, cols) in [(1, 32), (37, 96), (130, 2048), (9, 768)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed)).collect();
            let m = Mat::from_f32(rows, cols, w).unwrap().to_kind(kind);
            let x: Vec<f32> = (0..cols).map(|_| rng(&mut seed)).collect();
            let got = cuda::matmul_once(0, &m.view(), &x, 1, true).unwrap();
            let mut row = vec![0f32; cols];
            for (r, &g) in got.iter().enumerate() {
                m.row_f32(r, &mut row);
                let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let mag: f64 = row.iter().map(|a| a.abs() as f64).sum();
                // each input is off by at most half a step of max|x|/127 ≤ 1/127
                let bound = mag * 0.5 / 127.0 + 1e-5;
                let g = g as f64;
                assert!((g - want).abs() <= bound, "{} {rows}x{cols} row {r}: {g} vs {want}", kind.name());
            }
        }
    }
}

/// A prompt's products on tensor cores (bf16 inputs, bf16/q4/q8 rows rounded to bf16): within
/// the two roundings' bound of the exact product.
#[test]
fn tensor_core_matmul_stays_within_bf16_rounding() {
    if !gpu() {
        return;
    }
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let kinds = [
        WKind::BF16,
        WKind::Q { bits: 4, group: 32 },
        WKind::Q { bits: 4, group: 64 },
        WKind::Q { bits: 8, group: 64 },
    ];
    for kind in kinds {
        for (rows, cols) in [(37, 96), (130, 256), (64, 2048), (20, 112), (1, 64)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed)).collect();
            let m = Mat::from_f32(rows, cols, w).unwrap().to_kind(kind);
            for n in [2, 9, 33, 70] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng(&mut seed)).collect();
                let got = cuda::matmul_once(0, &m.view(), &x, n, true).unwrap();
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.row_f32(r, &mut row);
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let want: f64 = row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let g = got[t * rows + r] as f64;
                        // each factor within 2^-8 relative of its bf16 rounding
                        assert!(
                            (g - want).abs() <= mag * 2.0 / 256.0 + 1e-5,
                            "{} {rows}x{cols}, {n} tokens, row {r} token {t}: {g} vs {want}",
                            kind.name()
                        );
                    }
                }
            }
        }
    }
}

/// The default (fast) decode on the GPU against the float64 reference: q4 experts on int8
/// inputs, the same loose bounds as the CPU's fast path.
#[test]
fn fast_decode_on_cuda_stays_close_to_reference() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let r = reference(name);
        let mut m = load_model(&dir(name)).unwrap();
        m.requantize_experts(WKind::Q { bits: 4, group: 32 }).unwrap();
        m.accel = flashmoe::backend::attach(&m, Device::Cuda(0)).unwrap();
        let mut cpu = on_cpu(name);
        cpu.requantize_experts(WKind::Q { bits: 4, group: 32 }).unwrap();
        let mut seq = r.prompt.clone();
        seq.extend(&r.greedy[..r.greedy.len() - 1]);
        let (mut sg, mut sc) = (m.new_state(), cpu.new_state());
        let (mut top, mut kl) = (0usize, 0f64);
        for &t in &seq {
            let (g, c) = (m.forward(&mut sg, &[t], false).unwrap(), cpu.forward(&mut sc, &[t], false).unwrap());
            let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
            top += (argmax(&g) == argmax(&c)) as usize;
            let lsm = |v: &[f32]| {
                let mx = v.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let z = v.iter().map(|x| (*x as f64 - mx).exp()).sum::<f64>().ln() + mx;
                v.iter().map(|x| *x as f64 - z).collect::<Vec<_>>()
            };
            let (p, q) = (lsm(&c), lsm(&g));
            kl += p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
        }
        let (top, kl) = (top as f64 / seq.len() as f64, kl / seq.len() as f64);
        eprintln!("{name}: CUDA fast decode vs exact CPU: top-1 {top:.3}, mean KL {kl:.2e}");
        assert!(top >= 0.85 && kl <= 0.05, "{name}: top-1 {top}, KL {kl}");
        // the prompt at once: products on tensor cores (bf16 inputs), held to what the CPU's own
        // fast prefill (bf16 and int8 inputs) costs on the same model: these random fixtures'
        // nearly tied logits make q4 experts on rounded inputs flip some top-1s on both
        let g = m.forward(&mut m.new_state(), &r.prompt, true).unwrap();
        let c = cpu.forward(&mut cpu.new_state(), &r.prompt, true).unwrap();
        let want: Vec<Vec<f64>> = c.chunks(cpu.vocab_size()).map(|r| r.iter().map(|v| *v as f64).collect()).collect();
        cpu.opts.precision = Precision::Fast;
        let cf = cpu.forward(&mut cpu.new_state(), &r.prompt, true).unwrap();
        let (ctop, ckl) = agreement(&cf, &want);
        let (top, kl) = agreement(&g, &want);
        eprintln!(
            "{name}: fast prefill vs exact CPU: CUDA top-1 {top:.3}, KL {kl:.2e}; CPU top-1 {ctop:.3}, KL {ckl:.2e}"
        );
        assert!(top >= ctop.min(0.95) - 0.1 && kl <= 2.0 * ckl + 0.01, "{name}: prefill top-1 {top}, KL {kl}");
    }
}

#[test]
fn fixtures_match_reference_on_cuda() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let (m, r) = (on_cuda(name), reference(name));
        let flat = |rows: &[Vec<f64>]| rows.iter().flatten().copied().collect::<Vec<_>>();
        // prefill, all logits
        let got = m.forward(&mut m.new_state(), &r.prompt, true).unwrap();
        let e = rel_err(&got, &flat(&r.prefill));
        eprintln!("{name}: CUDA prefill relative max error {e:.2e}");
        assert!(e <= TOL, "{name}: CUDA prefill error {e:.2e}");
        // token by token
        let mut seq = r.prompt.clone();
        seq.extend(&r.greedy[..r.greedy.len() - 1]);
        let mut st = m.new_state();
        let mut got = vec![];
        for &t in &seq {
            got.extend(m.forward(&mut st, &[t], false).unwrap());
        }
        let e = rel_err(&got, &flat(&r.decode));
        eprintln!("{name}: CUDA decode relative max error {e:.2e}");
        assert!(e <= TOL, "{name}: CUDA decode error {e:.2e}");
        // prefill in two chunks, then decode; a snapshot of the state decodes alike
        let p = r.prompt.len();
        let mut st = m.new_state();
        let mut got = m.forward(&mut st, &r.prompt[..p / 2], true).unwrap();
        got.extend(m.forward(&mut st, &r.prompt[p / 2..], true).unwrap());
        let snap = st.clone();
        for &t in &r.greedy[..r.greedy.len() - 1] {
            got.extend(m.forward(&mut st, &[t], false).unwrap());
        }
        let e = rel_err(&got, &flat(&r.decode));
        assert!(e <= TOL, "{name}: CUDA chunked prefill + decode error {e:.2e}");
        let mut again = snap;
        let first = m.forward(&mut again, &[r.greedy[0]], false).unwrap();
        let row = r.decode.len() - r.greedy.len() + 1;
        assert!(rel_err(&first, &r.decode[row]) <= TOL, "{name}: a cloned CUDA state decodes differently");
    }
}

#[test]
fn quantized_experts_on_cuda_match_the_cpu() {
    if !gpu() {
        return;
    }
    for kind in [2u8, 3, 4, 8].map(|bits| WKind::Q { bits, group: 32 }) {
        for name in FIXTURES {
            let r = reference(name);
            let (mut cpu, mut gpu) = (on_cpu(name), load_model(&dir(name)).unwrap());
            cpu.requantize_experts(kind).unwrap();
            gpu.requantize_experts(kind).unwrap();
            gpu.opts.precision = Precision::Exact;
            gpu.accel = flashmoe::backend::attach(&gpu, Device::Cuda(0)).unwrap();
            let want = cpu.forward(&mut cpu.new_state(), &r.prompt, true).unwrap();
            let got = gpu.forward(&mut gpu.new_state(), &r.prompt, true).unwrap();
            let want: Vec<f64> = want.iter().map(|v| *v as f64).collect();
            let e = rel_err(&got, &want);
            eprintln!("{name}, {} experts: CUDA vs CPU prefill {e:.2e}", kind.name());
            assert!(e <= TOL, "{name}, {} experts: CUDA vs CPU {e:.2e}", kind.name());
        }
    }
}

#[test]
fn greedy_generation_on_cuda_equals_the_cpu() {
    if !gpu() {
        return;
    }
    for name in FIXTURES {
        let r = reference(name);
        let run = |m: &Model| {
            let p = SamplingParams { temperature: 0.0, ..Default::default() };
            let mut s = Sampler::new(p);
            generate(m, &mut m.new_state(), &r.prompt, 16, &mut s, &[], |_| true).unwrap().0
        };
        let (cpu, gpu) = (run(&on_cpu(name)), run(&on_cuda(name)));
        assert_eq!(cpu, gpu, "{name}: greedy continuations differ");
        let k = r.greedy.len().min(gpu.len());
        assert_eq!(&gpu[..k], &r.greedy[..k], "{name}: greedy continuation differs from transformers");
    }
}

#[test]
fn a_missing_device_is_a_clear_error() {
    let o = LoadOptions { device: Device::Cuda(99), ..Default::default() };
    let e = match load_model_with(&dir("qwen3_moe"), &o) {
        Ok(_) => panic!("cuda:99 loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("--device"), "{e}");
}
