//! Other shapes than the bundled fixture: random checkpoints of unusual configurations load,
//! and chunked, token-by-token and batched runs compute exactly what one prefill computes.

use hadal::backend::cpu::CpuBackend;
use hadal::config::Config;

fn variant(edits: serde_json::Value) -> Config {
    let mut v: serde_json::Value = serde_json::to_value(hadal::demo::demo_config()).unwrap();
    for (k, x) in edits.as_object().unwrap() {
        v[k] = x.clone();
    }
    Config::from_json(&v.to_string()).unwrap()
}

/// Logits of the prompts `seqs` fed in `chunks`, all in one batch.
fn run(m: &CpuBackend, seqs: &[Vec<u32>], chunks: &[usize]) -> Vec<f32> {
    hadal::score::score(m, seqs, chunks, false).unwrap().logits
}

/// Bit equality, naming the first logit that differs.
fn same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: logit {i} is {} instead of {}", got[i], want[i]);
    }
}

#[test]
fn unusual_shapes_are_consistent() {
    let variants = [
        serde_json::json!({"head_dim": 192, "o_groups": 4, "o_lora_rank": 64, "sliding_window": 5,
            "compress_ratios": [4, 128, 0, 4, 4], "index_topk": 3, "index_head_dim": 64,
            "num_hash_layers": 2, "hc_mult": 2, "hc_sinkhorn_iters": 3, "n_routed_experts": 4,
            "num_experts_per_tok": 3, "vocab_size": 300, "swiglu_limit": 0.0}),
        serde_json::json!({"num_hidden_layers": 2, "compress_ratios": [128, 128, 0], "sliding_window": 200,
            "num_hash_layers": 0, "vocab_size": 500, "rope_scaling": null}),
    ];
    for (i, edits) in variants.into_iter().enumerate() {
        let cfg = variant(edits);
        let dir = tempfile::tempdir().unwrap();
        hadal::demo::write_random_checkpoint(dir.path(), &cfg, 9 + i as u64).unwrap();
        let m = CpuBackend::open(dir.path()).unwrap();
        let v = cfg.vocab_size as u32;
        let a: Vec<u32> = (0..150).map(|t| (t * 37 + 11) % v).collect();
        let b: Vec<u32> = (0..150).map(|t| (t * 91 + 3) % v).collect();
        let one = run(&m, std::slice::from_ref(&a), &[150]);
        assert!(
            one.iter().all(|x| x.is_finite()),
            "variant {i}: non-finite logits"
        );
        let chunks = [7, 1, 60, 13, 69];
        same(
            &format!("variant {i}: chunked"),
            &run(&m, std::slice::from_ref(&a), &chunks),
            &one,
        );
        same(
            &format!("variant {i}: token by token"),
            &run(&m, std::slice::from_ref(&a), &[1; 150]),
            &one,
        );
        let both = run(&m, &[a.clone(), b], &[150]);
        same(&format!("variant {i}: batched"), &both[..one.len()], &one);
    }
}
