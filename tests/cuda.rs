//! The CUDA backend against the scalar reference (kernels) and the float64 `transformers`
//! reference (whole models). Built with `--features cuda`; `scripts/test_cuda.sh` runs them on a
//! GPU machine with FLASHMOE_REQUIRE_CUDA=1, where a missing device is a failure. Elsewhere
//! each test says it was not run.
#![cfg(feature = "cuda")]

mod common;

use common::{Reference, agreement, rel_err};
use flashmoe::backend::{Device, cuda};
use flashmoe::generate::{Sampler, SamplingParams, generate};
use flashmoe::layers::mlp::Mlp;
use flashmoe::load::{LoadOptions, load_model, load_model_with};
use flashmoe::model::Model;
use flashmoe::tensor::{Mat, Precision, WKind};
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

fn reference(name: &str) -> Reference {
    common::reference(&dir(name))
}

fn rng(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Random `kind` matrices of each shape times `ns` tokens of random inputs through the CUDA
/// product (`fast`: the default precision's kernels) against the scalar reference (rows
/// dequantized by `Mat::row_f32`, f64 dots). `bound(Σ|w·x|, Σ|w|)` is the error allowed.
fn check_products(
    kinds: &[WKind],
    shapes: &[(usize, usize)],
    ns: &[usize],
    fast: bool,
    bound: impl Fn(f64, f64) -> f64,
) {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for &kind in kinds {
        for &(rows, cols) in shapes {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng(&mut seed)).collect();
            let m = Mat::from_f32(rows, cols, w).unwrap().to_kind(kind);
            for &n in ns {
                let x: Vec<f32> = (0..n * cols).map(|_| rng(&mut seed)).collect();
                let got = cuda::matmul_once(0, &m.view(), &x, n, fast).unwrap();
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    m.row_f32(r, &mut row);
                    let wabs: f64 = row.iter().map(|a| a.abs() as f64).sum();
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let want: f64 = row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let g = got[t * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= bound(mag, wabs),
                            "{} {rows}x{cols}, {n} tokens, row {r} token {t}: {g} vs {want}",
                            kind.name()
                        );
                    }
                }
            }
        }
    }
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
    check_products(&kinds, &shapes, &[1, 3, 8, 11], false, |mag, _| 1e-5 * mag.max(1e-3));
}

/// Decode's integer kernel (int8 inputs, a scale per 32) on q4/q8 rows: within the input
/// rounding's bound of the exact product.
#[test]
fn int8_input_matvec_stays_within_its_rounding() {
    if !gpu() {
        return;
    }
    let kinds = [WKind::Q { bits: 4, group: 32 }, WKind::Q { bits: 4, group: 64 }, WKind::Q { bits: 8, group: 64 }];
    let shapes = [(1, 32), (37, 96), (130, 2048), (9, 768)];
    // each input is off by at most half a step of max|x|/127 ≤ 1/127
    check_products(&kinds, &shapes, &[1], true, |_, wabs| wabs * 0.5 / 127.0 + 1e-5);
}

/// A decode token's routed experts (gate/up, SwiGLU, down, the weighted sum over k experts): the
/// `_i8` kernels (every load of a warp issued at once; the k experts' down rows dealt to the
/// lanes together) equal the generic kernels on the same int8 inputs up to summation order, and
/// both stay within the int8 roundings of the float64 result; the f32 path within f32 rounding.
/// Shapes: the 30B model's (2048 × 768, 8 of 16 experts), odd ones (rows off the 8-warp block,
/// columns off a row of 32 lanes' loads), and some the `_i8` kernels refuse (columns off 32).
#[test]
fn decode_experts_match_the_float64_product() {
    if !gpu() {
        return;
    }
    let kinds = [WKind::Q { bits: 4, group: 32 }, WKind::Q { bits: 4, group: 64 }, WKind::Q { bits: 8, group: 64 }];
    // (hidden, inter, experts, k)
    let shapes: [(usize, usize, usize, usize); 6] =
        [(2048, 768, 16, 8), (96, 160, 5, 3), (64, 32, 4, 4), (256, 1056, 3, 1), (48, 40, 3, 2), (4096, 96, 9, 9)];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for kind in kinds {
        for (hidden, inter, n, k) in shapes {
            let mat = |rows: usize, cols: usize, seed: &mut u64| {
                Mat::from_f32(rows, cols, (0..rows * cols).map(|_| rng(seed)).collect()).unwrap().to_kind(kind)
            };
            let experts: Vec<Mlp> = (0..n)
                .map(|_| {
                    Mlp::new(
                        mat(inter, hidden, &mut seed),
                        mat(inter, hidden, &mut seed),
                        mat(hidden, inter, &mut seed),
                    )
                })
                .collect();
            let x: Vec<f32> = (0..hidden).map(|_| rng(&mut seed)).collect();
            let ids: Vec<i32> = (0..k).map(|j| ((j * 7 + 3) % n) as i32).collect();
            let wts: Vec<f32> = (0..k).map(|_| 0.5 + 0.5 * rng(&mut seed)).collect();
            // the float64 result on the dequantized rows
            let mut want = vec![0f64; hidden];
            let (mut row, mut drow) = (vec![0f32; hidden], vec![0f32; inter]);
            for (j, &e) in ids.iter().enumerate() {
                let m = &experts[e as usize];
                let act: Vec<f64> = (0..inter)
                    .map(|r| {
                        m.gate.row_f32(r, &mut row);
                        let g: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        m.up.row_f32(r, &mut row);
                        let u: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect();
                for (r, w) in want.iter_mut().enumerate() {
                    m.down.row_f32(r, &mut drow);
                    *w += wts[j] as f64 * drow.iter().zip(&act).map(|(a, b)| *a as f64 * b).sum::<f64>();
                }
            }
            let views: Vec<_> = experts.iter().map(|m| m.view()).collect();
            let run = |fast, i8| cuda::experts_once(0, &views, &x, &ids, &wts, fast, i8).unwrap();
            let top = want.iter().fold(0f64, |a, b| a.max(b.abs()));
            let err = |got: &[f32], want: &[f64]| {
                got.iter().zip(want).fold(0f64, |a, (g, w)| a.max((*g as f64 - w).abs())) / top
            };
            let (fast, generic, exact) = (run(true, true), run(true, false), run(false, true));
            let generic64: Vec<f64> = generic.iter().map(|v| *v as f64).collect();
            let (e_fast, e_gen, e_exact, e_pair) =
                (err(&fast, &want), err(&generic, &want), err(&exact, &want), err(&fast, &generic64));
            eprintln!(
                "{} {hidden}x{inter}, {k} of {n} experts: int8 kernels {e_fast:.1e}, generic {e_gen:.1e}, apart {e_pair:.1e}; f32 {e_exact:.1e}",
                kind.name()
            );
            let what = format!("{} {hidden}x{inter}, {k} of {n}", kind.name());
            assert!(e_pair <= 2e-3, "{what}: the int8 kernels and the generic ones differ by {e_pair:.2e}");
            assert!(e_fast <= 3e-2 && e_gen <= 3e-2, "{what}: int8 errors {e_fast:.2e} / {e_gen:.2e}");
            assert!(e_exact <= 1e-4, "{what}: f32 error {e_exact:.2e}");
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
    let kinds = [
        WKind::BF16,
        WKind::Q { bits: 4, group: 32 },
        WKind::Q { bits: 4, group: 64 },
        WKind::Q { bits: 8, group: 64 },
    ];
    let shapes = [(37, 96), (130, 256), (64, 2048), (20, 112), (1, 64)];
    // each factor within 2^-8 relative of its bf16 rounding
    check_products(&kinds, &shapes, &[2, 9, 33, 70], true, |mag, _| mag * 2.0 / 256.0 + 1e-5);
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
        // prefill, all logits
        let got = m.forward(&mut m.new_state(), &r.prompt, true).unwrap();
        let e = rel_err(&got, &r.prefill);
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
        let e = rel_err(&got, &r.decode);
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
        let e = rel_err(&got, &r.decode);
        assert!(e <= TOL, "{name}: CUDA chunked prefill + decode error {e:.2e}");
        let mut again = snap;
        let first = m.forward(&mut again, &[r.greedy[0]], false).unwrap();
        let row = r.decode.len() - r.greedy.len() + 1;
        assert!(rel_err(&first, &r.decode[row..row + 1]) <= TOL, "{name}: a cloned CUDA state decodes differently");
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
            let want = vec![want.iter().map(|v| *v as f64).collect::<Vec<f64>>()];
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
