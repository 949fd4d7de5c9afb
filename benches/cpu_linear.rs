//! The CPU's one-row products (decode's), one for each weight format at V4-Flash's shapes:
//! time a product and bytes of weights read a second (`cargo bench --bench cpu_linear`).
//! `hadal bench --device cpu` measures whole layers against the machine's streaming bandwidth;
//! this tells the formats' kernels apart.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hadal::backend::cpu::{linear, tiled, Numerics};
use hadal::checkpoint::Bytes;
use hadal::weights::{Matrix, Storage};

/// A `rows x cols` matrix of deterministic codes: FP8 without its NaN codes, scales near 1.
fn matrix(fmt: &str, rows: usize, cols: usize) -> Matrix {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as u8
            })
            .collect()
    };
    let storage = match fmt {
        "fp8" => Storage::F8 {
            w: Bytes::owned(bytes(rows * cols).into_iter().map(|b| b & 0xfe).collect()),
            s: Bytes::owned(vec![120; rows.div_ceil(128) * cols.div_ceil(128)]),
        },
        "fp4" => Storage::F4 {
            w: Bytes::owned(bytes(rows * cols / 2)),
            s: Bytes::owned(vec![120; rows * cols / 32]),
        },
        _ => Storage::Bf16(Bytes::owned(
            bytes(rows * cols * 2)
                .chunks(2)
                .flat_map(|p| [p[0], 0x3c + p[1] % 8])
                .collect(),
        )),
    };
    Matrix {
        rows,
        cols,
        storage,
    }
}

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("one-row product");
    g.sample_size(20);
    for (fmt, what, rows, cols, bytes_per_weight) in [
        ("fp8", "wq_b", 32768, 1024, 1.0),
        ("fp8", "shared expert w1", 2048, 4096, 1.0),
        ("fp4", "routed expert w1", 2048, 4096, 0.5),
        ("bf16", "a sixteenth of the head", 8080, 4096, 2.0),
        // Small enough to stay in a core's L2 from one call to the next: the kernels' own
        // rate, without main memory.
        ("fp8", "in cache", 64, 4096, 1.0),
        ("fp4", "in cache", 128, 4096, 0.5),
        // The demo model's head, summed in chain order: rows as stored, and tiled as the CPU
        // device stores them.
        ("bf16", "the demo's head", 129280, 256, 2.0),
        ("tiled", "the demo's head", 129280, 256, 2.0),
    ] {
        let m = matrix(fmt, rows, cols);
        let m = if fmt == "tiled" {
            tiled(m, Numerics::BatchInvariant)
        } else {
            m
        };
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        g.throughput(Throughput::Bytes(
            (rows as f64 * cols as f64 * bytes_per_weight) as u64,
        ));
        g.bench_function(format!("{fmt} {what} {rows}x{cols}"), |b| {
            b.iter(|| linear(&m, &x, Numerics::BatchInvariant))
        });
    }
    g.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
