//! Loading: every malformed checkpoint or config is an error that names the problem.

mod common;

use hadal::backend::cpu::CpuBackend;
use hadal::backend::{Backend, Head, SeqInput};
use hadal::Error;
use safetensors::Dtype;

fn load_err(dir: &std::path::Path) -> String {
    match CpuBackend::open(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let d = common::damaged(|t| {
        t.remove("layers.2.attn.compressor.wgate.weight");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("layers.2.attn.compressor.wgate.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn extra_tensor_is_named() {
    let d = common::damaged(|t| {
        t.insert(
            "layers.9.attn.wq_a.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains("layers.9.attn.wq_a.weight") && e.contains("not part of the model"),
        "{e}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let d = common::damaged(|t| {
        let w = t.get_mut("layers.1.attn.q_norm.weight").unwrap();
        w.1 = vec![64];
        w.2.truncate(128);
    });
    let e = load_err(d.path());
    assert!(
        e.contains("layers.1.attn.q_norm.weight") && e.contains("shape [64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let d = common::damaged(|t| {
        let w = t.get_mut("layers.0.ffn.experts.3.w2.scale").unwrap();
        w.0 = Dtype::U8;
    });
    let e = load_err(d.path());
    assert!(
        e.contains("layers.0.ffn.experts.3.w2.scale") && e.contains("F8_E8M0"),
        "{e}"
    );
}

#[test]
fn truncated_file_names_the_tensor() {
    let d = common::damaged(|_| {});
    let f = d.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 1000).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("truncated") && e.contains("tensor "), "{e}");
}

#[test]
fn out_of_range_hash_expert_is_refused() {
    let d = common::damaged(|t| {
        let w = t.get_mut("layers.0.ffn.gate.tid2eid").unwrap();
        w.2[..4].copy_from_slice(&99i32.to_le_bytes());
    });
    let e = load_err(d.path());
    assert!(e.contains("tid2eid") && e.contains("99"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_and_computes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let all = common::read(&common::fixture().join("model.safetensors"));
    let (mut a, mut b) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    let mut map = serde_json::Map::new();
    for (i, (n, t)) in all.into_iter().enumerate() {
        // Hugging Face style names for half of them, to exercise the canonical mapping.
        let (shard, name) = if i % 2 == 0 {
            (&mut a, format!("model.{n}"))
        } else {
            (&mut b, n)
        };
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(name.clone(), file.into());
        shard.insert(name, t);
    }
    common::write(&dir.path().join("model-00001-of-00002.safetensors"), &a);
    common::write(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let sharded = CpuBackend::open(dir.path()).unwrap();
    let single = CpuBackend::open(&common::fixture()).unwrap();
    let tokens = [5u32, 17, 900, 3, 3, 64, 1000, 2];
    let run = |m: &CpuBackend| {
        let mut st = m.new_state().unwrap();
        let h = m
            .forward(&mut [SeqInput {
                state: &mut st,
                tokens: &tokens,
            }])
            .unwrap();
        m.logits(Head::Main, &h, &[0, 1, 2, 3, 4, 5, 6, 7]).unwrap()
    };
    assert_eq!(run(&sharded), run(&single));
}

#[test]
fn bad_inputs_to_forward_are_errors() {
    let m = CpuBackend::open(&common::fixture()).unwrap();
    let mut st = m.new_state().unwrap();
    let v = m.config().vocab_size as u32;
    match m.forward(&mut [SeqInput {
        state: &mut st,
        tokens: &[1, v],
    }]) {
        Err(Error::Input(e)) => assert!(e.contains(&v.to_string()), "{e}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(st.pos(), 0, "a refused batch must not advance the state");
    let mut wrong = m.new_mtp_state(0).unwrap();
    assert!(m
        .forward(&mut [SeqInput {
            state: &mut wrong,
            tokens: &[1]
        }])
        .is_err());
}

mod config {
    use hadal::config::Config;

    fn base() -> serde_json::Value {
        serde_json::from_str(include_str!("fixtures/deepseek-v4-pro.config.json")).unwrap()
    }

    fn err(v: serde_json::Value) -> String {
        Config::from_json(&v.to_string()).unwrap_err().to_string()
    }

    #[test]
    fn pro_config_parses() {
        let c = Config::from_json(&base().to_string()).unwrap();
        assert_eq!(c.num_hidden_layers, 61);
        assert_eq!(c.compress_ratios.len(), 62);
    }

    #[test]
    fn other_model_types_are_refused() {
        let mut v = base();
        v["model_type"] = "deepseek_v3".into();
        assert!(err(v).contains("deepseek_v3"));
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(err(v).contains("missing key `hidden_size`"));
    }

    #[test]
    fn dspark_release_is_refused_by_name() {
        let mut v = base();
        v["dspark_target_layer_ids"] = serde_json::json!([40, 41, 42]);
        v["dspark_block_size"] = 5.into();
        assert!(err(v).contains("DSpark"));
    }

    #[test]
    fn longer_compress_ratios_are_refused() {
        let mut v = base();
        v["compress_ratios"]
            .as_array_mut()
            .unwrap()
            .extend([4.into(), 4.into()]);
        assert!(err(v).contains("compress_ratios has 64 entries"));
    }

    #[test]
    fn bad_ratio_is_named() {
        let mut v = base();
        v["compress_ratios"][5] = 8.into();
        assert!(err(v).contains("compress_ratios[5] = 8"));
    }

    proptest::proptest! {
        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = Config::from_json(&s);
        }

        /// Any key replaced by an arbitrary JSON scalar gives a value or an error, never a panic.
        #[test]
        fn mutated_configs_never_panic(key in 0usize..60, val in proptest::prop_oneof![
            proptest::num::i64::ANY.prop_map(serde_json::Value::from),
            proptest::num::f64::ANY.prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
            proptest::bool::ANY.prop_map(serde_json::Value::from),
        ]) {
            let mut v = base();
            let obj = v.as_object_mut().unwrap();
            let k = obj.keys().nth(key % obj.len()).unwrap().clone();
            obj.insert(k, val);
            if let Ok(cfg) = Config::from_json(&v.to_string()) {
                let p = hadal::inspect::Plan::new(&cfg, cfg.max_position_embeddings);
                let _ = p.render(&cfg);
            }
        }
    }

    use proptest::strategy::Strategy;
}
