//! The CUDA backend against the CPU backend (the oracle) on random inputs, at small shapes and at
//! V4-Flash's and V4-Pro's. Every test says it skipped where no CUDA device is present.
//!
//! Bounds: a product of decoded FP8/FP4/BF16 values is exact in f32 on both devices, so they
//! differ only in the order of sums (relative error ~1e-6); an FP8 rounding or a top-k choice
//! flipped by such an ulp changes a value, so whole blocks are held to check 2's bounds.

use std::sync::OnceLock;

use hadal::backend::cpu::{Cpu, CpuBackend};
use hadal::backend::cuda::{Cuda, CudaBackend};
use hadal::backend::{Backend, Device, Draw, Head, Runner, SeqInput};
use hadal::checkpoint::Bytes;
use hadal::config::Config;
use hadal::generate::{Sampler, SamplingParams};
use hadal::model::Model;
use hadal::quant::{encode_e4m3, round_e4m3, FP4_WEIGHT_BLOCK};
use hadal::weights::{Matrix, Storage};

/// The GPU, or None after saying the test is skipped.
fn gpu(test: &str) -> Option<&'static Cuda> {
    static DEV: OnceLock<Option<Cuda>> = OnceLock::new();
    let d = DEV.get_or_init(|| {
        if hadal::backend::cuda::device_count() == 0 {
            return None;
        }
        Some(Cuda::new(0).expect("open cuda:0"))
    });
    if d.is_none() {
        eprintln!("{test}: skipped (no CUDA device)");
    }
    d.as_ref()
}

/// SplitMix64 values in [-1, 1).
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

/// A random `rows x cols` matrix in `fmt` with realistic scales.
fn matrix(fmt: &str, rows: usize, cols: usize, r: &mut Rand) -> Matrix {
    let bytes = |v: Vec<u8>| Bytes::owned(v);
    let storage = match fmt {
        "FP8" => {
            let w = (0..rows * cols)
                .map(|_| encode_e4m3(round_e4m3(r.f() * 448.0)))
                .collect();
            let s = (0..rows.div_ceil(128) * cols.div_ceil(128))
                .map(|_| 112 + (r.next() % 6) as u8)
                .collect();
            Storage::F8 {
                w: bytes(w),
                s: bytes(s),
            }
        }
        "FP4" => {
            let w = (0..rows * cols / 2).map(|_| r.next() as u8).collect();
            let s = (0..rows * cols / FP4_WEIGHT_BLOCK)
                .map(|_| 118 + (r.next() % 6) as u8)
                .collect();
            Storage::F4 {
                w: bytes(w),
                s: bytes(s),
            }
        }
        "BF16" => Storage::Bf16(bytes(
            r.vec(rows * cols, 0.05)
                .iter()
                .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
        )),
        _ => Storage::F32(bytes(
            r.vec(rows * cols, 0.05)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        )),
    };
    Matrix {
        rows,
        cols,
        storage,
    }
}

/// Per-row relative errors `|a - b| / |b|` of rows of width `w`.
fn rel(a: &[f32], b: &[f32], w: usize) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "lengths");
    a.chunks(w)
        .zip(b.chunks(w))
        .map(|(x, y)| {
            let n: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            let d: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
            (n / d.max(1e-30)).sqrt()
        })
        .collect()
}

fn worst(e: &[f64]) -> f64 {
    e.iter().copied().fold(0.0, f64::max)
}

/// Check 2's bounds: <= 1e-3 at >= 95% of rows, <= 5e-2 at every row.
fn assert_check2(what: &str, errs: &[f64]) {
    let ok = errs.iter().filter(|&&e| e <= 1e-3).count() as f64 / errs.len() as f64;
    eprintln!(
        "{what}: {:.1}% of {} rows within 1e-3, worst {:.2e}",
        100.0 * ok,
        errs.len(),
        worst(errs)
    );
    assert!(
        ok >= 0.95 && worst(errs) <= 5e-2,
        "{what} outside check 2's bounds"
    );
}

#[test]
fn linears_match_the_cpu() {
    let Some(cuda) = gpu("linears_match_the_cpu") else {
        return;
    };
    let cpu = Cpu::default();
    let mut r = Rand(1);
    // (format, rows, cols): small, V4-Flash's and V4-Pro's projections, experts and mixes.
    let shapes = [
        ("FP8", 130, 256),
        ("FP4", 64, 128),
        ("BF16", 40, 96),
        ("F32", 24, 200),
        ("FP8", 1024, 4096),
        ("FP8", 32768, 1024),
        ("FP8", 4096, 8192),
        ("FP4", 2048, 4096),
        ("FP4", 4096, 2048),
        ("BF16", 1024, 4096),
        ("F32", 24, 16384),
        ("FP8", 1536, 7168),
        ("FP4", 3072, 7168),
        ("FP4", 7168, 3072),
        ("BF16", 384, 7168),
    ];
    for (fmt, n, k) in shapes {
        let m = matrix(fmt, n, k, &mut r);
        let w = cuda.weight(m.clone()).unwrap();
        for rows in [1usize, 3, 8, 37] {
            let x = r.vec(rows * k, 2.0);
            let want = cpu.linear(&m, &x).unwrap();
            let got = cuda
                .download(&cuda.linear(&w, &cuda.upload(&x, k).unwrap()).unwrap())
                .unwrap();
            let e = worst(&rel(&got, &want, n));
            eprintln!("{fmt} {n}x{k}, {rows} rows: worst {e:.2e}");
            assert!(
                e < 2e-5,
                "{fmt} {n}x{k}, {rows} rows: relative error {e:.2e}"
            );
        }
    }
}

#[test]
fn grouped_output_projection_matches_the_cpu() {
    let Some(cuda) = gpu("grouped_output_projection_matches_the_cpu") else {
        return;
    };
    let cpu = Cpu::default();
    let mut r = Rand(2);
    // wo_a: (groups, rank per group, input per group): tiny-a's, V4-Flash's, V4-Pro's.
    for (g, rank, gw) in [(2, 128, 256), (8, 1024, 4096), (16, 1024, 4096)] {
        let m = matrix("FP8", g * rank, gw, &mut r);
        let w = cuda.weight(m.clone()).unwrap();
        for rows in [1usize, 5, 70] {
            let x = r.vec(rows * g * gw, 1.0);
            let want = cpu.grouped_linear(&m, &x, g).unwrap();
            let xt = cuda.upload(&x, g * gw).unwrap();
            let got = cuda
                .download(&cuda.grouped_linear(&w, &xt, g).unwrap())
                .unwrap();
            let e = worst(&rel(&got, &want, g * rank));
            assert!(
                e < 2e-5,
                "wo_a {g} groups, {rows} rows: relative error {e:.2e}"
            );
        }
    }
}

/// The same random model on both devices (the demo's weights, or synthetic codes).
fn both(cfg: &Config, seed: u64) -> (CpuBackend, CudaBackend) {
    both_with(cfg, &|| hadal::demo::random_checkpoint(cfg, seed))
}

fn both_with(
    cfg: &Config,
    ck: &dyn Fn() -> hadal::checkpoint::Checkpoint,
) -> (CpuBackend, CudaBackend) {
    let cuda = Cuda::new(0).unwrap();
    let cpu_model = Model::from_checkpoint(&Cpu::default(), cfg.clone(), ck(), &|_, _| {}).unwrap();
    let gpu_model = Model::from_checkpoint(&cuda, cfg.clone(), ck(), &|_, _| {}).unwrap();
    (
        Runner::new(Cpu::default(), cpu_model),
        Runner::new(cuda, gpu_model),
    )
}

/// Each block fed the CPU's own input stream (a prefill in chunks of `chunk`, then `decode`
/// one-token steps) on both devices, compared by check 2's bounds.
fn blocks_teacher_forced(
    (cpu, gpu): (CpuBackend, CudaBackend),
    tokens: &[u32],
    chunk: usize,
    decode: usize,
) {
    let cfg = cpu.config().clone();
    let w = cfg.hc_mult * cfg.hidden_size;
    let n = tokens.len();
    let mut x = cpu.model.embed_tokens(tokens);
    for layer in 0..cfg.num_hidden_layers {
        let mut sc = cpu.new_layer_state(layer).unwrap();
        let mut sg = gpu.new_layer_state(layer).unwrap();
        let (mut yc, mut yg) = (Vec::new(), Vec::new());
        let mut pos = 0;
        while pos < n {
            let len = if pos < n - decode {
                chunk.min(n - decode - pos)
            } else {
                1
            };
            let xs = &x[pos * w..(pos + len) * w];
            let t = &tokens[pos..pos + len];
            yc.extend(
                cpu.block_forward(
                    layer,
                    xs,
                    &mut SeqInput {
                        state: &mut sc,
                        tokens: t,
                    },
                )
                .unwrap(),
            );
            yg.extend(
                gpu.block_forward(
                    layer,
                    xs,
                    &mut SeqInput {
                        state: &mut sg,
                        tokens: t,
                    },
                )
                .unwrap(),
            );
            pos += len;
        }
        assert_check2(
            &format!("block {layer} (ratio {})", cfg.ratio(layer)),
            &rel(&yg, &yc, w),
        );
        x = yc;
    }
}

#[test]
fn blocks_match_the_cpu_at_small_shapes() {
    if gpu("blocks_match_the_cpu_at_small_shapes").is_none() {
        return;
    }
    let cfg = hadal::demo::demo_config();
    let tokens: Vec<u32> = (0..300).map(|i| (i * 7919 % 1000) as u32).collect();
    blocks_teacher_forced(both(&cfg, 7), &tokens, 128, 20);
}

#[test]
fn blocks_match_the_cpu_at_v4_flash_shapes() {
    if gpu("blocks_match_the_cpu_at_v4_flash_shapes").is_none() {
        return;
    }
    // V4-Flash's widths (hidden 4096, 64 heads of 512, window 128, q rank 1024, indexer 64 x 128,
    // experts 2048 wide) in a CSA, an HCA and a window block, with synthetic FP8/FP4 codes. Fewer
    // experts, a small vocabulary and a top-64 over 160 entries keep the CPU's side quick (the
    // top-512 over 2,500 tokens runs through `hadal score`, tools/device/run.sh).
    let mut v: serde_json::Value = serde_json::from_str(hadal::demo::FLASH_CONFIG).unwrap();
    for (k, x) in [
        ("num_hidden_layers", serde_json::json!(3)),
        ("compress_ratios", serde_json::json!([4, 128, 0])),
        ("num_hash_layers", serde_json::json!(1)),
        ("n_routed_experts", serde_json::json!(8)),
        ("vocab_size", serde_json::json!(1024)),
        ("index_topk", serde_json::json!(64)),
        ("num_nextn_predict_layers", serde_json::json!(0)),
    ] {
        v[k] = x;
    }
    let cfg = Config::from_json(&v.to_string()).unwrap();
    let tokens: Vec<u32> = (0..640).map(|i| (i * 7919 % 1024) as u32).collect();
    let pair = both_with(&cfg, &|| hadal::demo::synthetic_checkpoint(&cfg, 5));
    blocks_teacher_forced(pair, &tokens, 512, 8);
}

#[test]
fn whole_model_matches_the_cpu() {
    if gpu("whole_model_matches_the_cpu").is_none() {
        return;
    }
    let cfg = hadal::demo::demo_config();
    let (cpu, gpu) = both(&cfg, 11);
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|s| {
            (0..200)
                .map(|i| ((i * 31 + s * 977) % 5000) as u32)
                .collect()
        })
        .collect();
    let a = hadal::score::score(&cpu, &seqs, &[150], true).unwrap();
    let b = hadal::score::score(&gpu, &seqs, &[150], true).unwrap();
    let v = cfg.vocab_size;
    let errs = rel(&b.logits, &a.logits, v);
    let mean = errs.iter().sum::<f64>() / errs.len() as f64;
    eprintln!(
        "logits: mean relative error {mean:.2e}, worst {:.2e}",
        worst(&errs)
    );
    assert_check2("logits", &errs);
    assert_check2(
        "MTP logits",
        &rel(
            b.mtp_logits.as_ref().unwrap(),
            a.mtp_logits.as_ref().unwrap(),
            v,
        ),
    );
    // Chunked and token-by-token on the GPU agree with its one prefill (check 5).
    let one = hadal::score::score(&gpu, &seqs[..1], &[200], false).unwrap();
    let chunked = hadal::score::score(&gpu, &seqs[..1], &[1, 60, 5, 128, 6], false).unwrap();
    assert_check2("GPU chunked prefill", &rel(&chunked.logits, &one.logits, v));
}

#[test]
fn greedy_generation_and_speculation_run_on_the_gpu() {
    if gpu("greedy_generation_and_speculation_run_on_the_gpu").is_none() {
        return;
    }
    let cfg = hadal::demo::demo_config();
    let (_, gpu) = both(&cfg, 3);
    let tok = hadal::tokenizer::Tokenizer::bundled();
    let params = SamplingParams {
        max_tokens: 24,
        ..Default::default()
    };
    let prompt: Vec<u32> = (0..40).map(|i| (i * 97 % 3000) as u32).collect();
    let run = |spec: bool| {
        let mut s = gpu.new_state().unwrap();
        let p = hadal::generate::Prefill {
            chunk: 16,
            progress: None,
        };
        if spec {
            hadal::generate::generate_speculative(&gpu, &tok, &mut s, &prompt, &params, p, |_| true)
        } else {
            hadal::generate::generate(&gpu, &tok, &mut s, &prompt, &params, p, |_| true)
        }
        .unwrap()
    };
    let plain = run(false);
    let spec = run(true);
    assert_eq!(plain.tokens.len(), 24);
    assert_eq!(
        spec.tokens, plain.tokens,
        "greedy speculative equals greedy"
    );
    assert!(spec.drafts.0 > 0);
}

#[test]
fn sampling_on_the_gpu_keeps_the_distribution() {
    let Some(cuda) = gpu("sampling_on_the_gpu_keeps_the_distribution") else {
        return;
    };
    // Greedy and log-probabilities on a real vocabulary.
    let mut r = Rand(5);
    let v = 129_280;
    let logits = r.vec(3 * v, 8.0);
    let t = cuda.upload(&logits, v).unwrap();
    let mut samplers: Vec<Sampler> = (0..3)
        .map(|_| {
            Sampler::new(SamplingParams {
                logprobs: Some(5),
                ..Default::default()
            })
        })
        .collect();
    let mut draws: Vec<Draw> = samplers
        .iter_mut()
        .map(|s| Draw {
            sampler: s,
            draft: None,
        })
        .collect();
    let got = cuda.sample(&t, &mut draws).unwrap();
    for (i, g) in got.iter().enumerate() {
        let row = &logits[i * v..(i + 1) * v];
        let want = Sampler::new(SamplingParams {
            logprobs: Some(5),
            ..Default::default()
        })
        .sample(row);
        assert_eq!(g.token, want.0, "row {i}: greedy token");
        let (gl, wl) = (g.logprob.as_ref().unwrap(), want.1.as_ref().unwrap());
        assert!((gl.logprob - wl.logprob).abs() < 1e-4, "row {i}: logprob");
        let ids = |l: &hadal::generate::TokenLogprob| l.top.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(ids(gl), ids(wl), "row {i}: alternatives");
    }
    // Frequencies of sampled tokens follow the filtered distribution.
    let small = [0.0f32, 1.0, 2.0, 0.5, -1.0, 1.5];
    let p: Vec<f64> = small.iter().map(|&x| (x as f64).exp()).collect();
    let check = |params: SamplingParams, expect: &dyn Fn(usize) -> f64| {
        let n = 4000;
        let rows: Vec<f32> = small
            .iter()
            .copied()
            .cycle()
            .take(n * small.len())
            .collect();
        let t = cuda.upload(&rows, small.len()).unwrap();
        let mut ss: Vec<Sampler> = (0..n)
            .map(|i| {
                Sampler::new(SamplingParams {
                    seed: params.seed * 100_000 + i as u64,
                    ..params.clone()
                })
            })
            .collect();
        let mut draws: Vec<Draw> = ss
            .iter_mut()
            .map(|x| Draw {
                sampler: x,
                draft: None,
            })
            .collect();
        let mut counts = vec![0usize; small.len()];
        for d in cuda.sample(&t, &mut draws).unwrap() {
            counts[d.token as usize] += 1;
        }
        for (i, c) in counts.iter().enumerate() {
            let f = *c as f64 / n as f64;
            assert!(
                (f - expect(i)).abs() < 0.03,
                "token {i}: {f:.3} vs {:.3}",
                expect(i)
            );
        }
    };
    let z: f64 = p.iter().sum();
    check(
        SamplingParams {
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        },
        &|i| p[i] / z,
    );
    // top_k = 2 keeps tokens 2 and 5.
    let z2 = p[2] + p[5];
    check(
        SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 2,
            ..Default::default()
        },
        &|i| if i == 2 || i == 5 { p[i] / z2 } else { 0.0 },
    );
    // min_p = 0.5 keeps tokens within half of the best's probability: 2 and 5.
    check(
        SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            seed: 3,
            ..Default::default()
        },
        &|i| if i == 2 || i == 5 { p[i] / z2 } else { 0.0 },
    );
}

#[test]
fn states_move_between_host_and_gpu_losslessly() {
    if gpu("states_move_between_host_and_gpu_losslessly").is_none() {
        return;
    }
    let cfg = hadal::demo::demo_config();
    let (cpu, gpu) = both(&cfg, 13);
    // Mid-block everywhere: 301 tokens leave pending compressor rows and a partly filled window.
    let prompt: Vec<u32> = (0..301).map(|i| (i * 61 % 4000) as u32).collect();
    let mut a = gpu.new_state().unwrap();
    gpu.forward(&mut [SeqInput {
        state: &mut a,
        tokens: &prompt,
    }])
    .unwrap();
    let host = gpu.export_state(&a).unwrap();
    assert_eq!(host.pos, 301);
    let mut b = gpu.import_state(&host).unwrap();
    assert_eq!(
        gpu.export_state(&b).unwrap(),
        host,
        "GPU -> host -> GPU -> host is exact"
    );
    // The host state is also a valid CPU state.
    let mut c = cpu.import_state(&host).unwrap();
    let next = [17u32, 18, 19];
    let run = |be: &dyn Backend, s: &mut hadal::backend::Seq| {
        let h = be
            .forward(&mut [SeqInput {
                state: s,
                tokens: &next,
            }])
            .unwrap();
        be.logits(Head::Main, &h, &[0, 1, 2]).unwrap()
    };
    let la = run(&gpu, &mut a);
    let lb = run(&gpu, &mut b);
    assert_eq!(la, lb, "a state restored on the GPU continues identically");
    assert_check2(
        "CPU continuing a GPU state",
        &rel(&run(&cpu, &mut c), &la, cfg.vocab_size),
    );
    // Marks, rewinds and copies.
    let mark = a.mark().unwrap();
    let copy = a.try_clone().unwrap();
    run(&gpu, &mut a);
    a.rewind(&mark).unwrap();
    assert_eq!(
        gpu.export_state(&a).unwrap(),
        gpu.export_state(&copy).unwrap(),
        "rewinding restores the state exactly"
    );
}

#[test]
fn a_full_pool_refuses_without_touching_other_sequences() {
    if gpu("a_full_pool_refuses_without_touching_other_sequences").is_none() {
        return;
    }
    let cfg = hadal::demo::demo_config();
    // A pool of about one slab of each page size: room for a short sequence only.
    let cuda = Cuda::with_state_pool(0, Some(2 << 20)).unwrap();
    let model = Model::from_checkpoint(
        &cuda,
        cfg.clone(),
        hadal::demo::random_checkpoint(&cfg, 17),
        &|_, _| {},
    )
    .unwrap();
    let gpu = Runner::new(cuda, model);
    let prompt: Vec<u32> = (0..64).map(|i| i as u32 + 10).collect();
    let mut a = gpu.new_state().unwrap();
    gpu.forward(&mut [SeqInput {
        state: &mut a,
        tokens: &prompt,
    }])
    .unwrap();
    let before = gpu.export_state(&a).unwrap();
    // A long prompt beside it needs more pages than the pool may hold: refused before anything
    // runs, as one past the model's context is.
    for len in [20_000, cfg.max_position_embeddings + 1] {
        let mut b = gpu.new_state().unwrap();
        let long = vec![5u32; len];
        let e = gpu.forward(&mut [
            SeqInput {
                state: &mut a,
                tokens: &[1],
            },
            SeqInput {
                state: &mut b,
                tokens: &long,
            },
        ]);
        eprintln!(
            "{len} tokens: {}",
            e.as_ref().err().map_or(String::new(), |e| e.to_string())
        );
        assert!(e.is_err(), "{len} tokens were accepted");
        assert_eq!(
            gpu.export_state(&a).unwrap(),
            before,
            "the other sequence is untouched"
        );
        assert_eq!(b.pos(), 0);
    }
}
