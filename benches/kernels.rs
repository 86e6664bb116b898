//! Kernel throughput in GB/s of weight bytes streamed, single thread, on matrices larger than
//! the last-level cache (so memory bandwidth is the limit). `cargo bench --bench kernels`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flashmoe::generate::{Sampler, SamplingParams};
use flashmoe::quant;
use flashmoe::tensor::{AlignedBytes, Mat, Precision, WKind};

fn matrices(rows: usize, cols: usize) -> Vec<(String, Mat)> {
    let mut s = 1u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let f32m = Mat::from_f32(rows, cols, w.clone()).unwrap();
    let mut v = vec![("bf16".to_string(), f32m.to_kind(WKind::BF16))];
    for bits in [8u8, 4, 3, 2] {
        let blob = quant::quantize(&w, rows, cols, bits, 64);
        let k = WKind::Q { bits, group: 64 };
        v.push((format!("q{bits}"), Mat::from_bytes(rows, cols, k, AlignedBytes::from_slice(&blob)).unwrap()));
    }
    v.push(("f32".to_string(), f32m));
    v
}

fn bench(c: &mut Criterion) {
    // one thread: the target is a fraction of single-thread memory bandwidth
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (rows, cols) = (16384, 4096); // 64M weights: 32 MiB at q4, 128 MiB at bf16
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut g = c.benchmark_group("matvec_1thread");
    g.sample_size(10);
    for (name, m) in matrices(rows, cols) {
        let mut y = vec![0.0; rows];
        g.throughput(Throughput::Bytes(m.bytes() as u64));
        g.bench_function(&name, |b| b.iter(|| pool.install(|| m.matvec(&x, &mut y, Precision::Fast))));
    }
    g.finish();
    let mut g = c.benchmark_group("matmul_16tok_1thread");
    g.sample_size(10);
    let xs: Vec<f32> = (0..cols * 16).map(|i| (i % 17) as f32 * 0.01).collect();
    for (name, m) in matrices(4096, 4096).into_iter().filter(|(n, _)| n == "q4" || n == "bf16") {
        let mut y = vec![0.0; 4096 * 16];
        g.throughput(Throughput::Elements((4096 * 4096 * 16) as u64));
        // default: bf16 activations (vdpbf16ps) where the CPU has AVX-512 BF16; exact: f32 FMA
        g.bench_function(&name, |b| b.iter(|| pool.install(|| m.matmul(&xs, 16, &mut y, Precision::Fast))));
        g.bench_function(format!("{name}-exact"), |b| {
            b.iter(|| pool.install(|| m.matmul(&xs, 16, &mut y, Precision::Exact)))
        });
    }
    g.finish();
    // sampling one token over Qwen3.5's 248,320-token vocabulary, per token of decode
    let mut g = c.benchmark_group("sample_248k_vocab");
    let mut st = 7u64;
    let logits: Vec<f32> = (0..248_320)
        .map(|_| {
            st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (st >> 40) as f32 / (1u64 << 24) as f32;
            20.0 * u * u * u * u - 2.0 // a few likely tokens, a long tail
        })
        .collect();
    let history: Vec<u32> = (0..512).map(|i| (i * 997) % 248_320).collect();
    let cli =
        SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.95, repetition_penalty: 1.1, ..Default::default() };
    let api = SamplingParams { temperature: 1.0, ..Default::default() };
    for (name, p) in [("cli_defaults", cli), ("openai_defaults", api)] {
        let mut s = Sampler::new(p);
        let mut l = logits.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                l.copy_from_slice(&logits);
                s.sample(&mut l, &history)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
