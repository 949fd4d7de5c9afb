//! Generation on the golden fixture's model: reproducible sampling, stop strings, limits.

mod common;

use hadal::backend::cpu::CpuBackend;
use hadal::backend::{Backend, Head, Seq, SeqInput};
use hadal::generate::{generate, Completion, Finish, Prefill, SamplingParams};
use hadal::tokenizer::Tokenizer;

fn run(backend: &CpuBackend, tok: &Tokenizer, params: &SamplingParams) -> (Completion, String) {
    let mut state = backend.new_state().unwrap();
    let mut streamed = String::new();
    let prompt = [0u32, 17, 300, 301, 5];
    let c = generate(
        backend,
        tok,
        &mut state,
        &prompt,
        params,
        Prefill {
            chunk: 2,
            progress: None,
        },
        |t| {
            streamed.push_str(t);
            true
        },
    )
    .unwrap();
    // The state holds the prompt and every generated token but the last.
    assert_eq!(state.pos(), prompt.len() + c.tokens.len() - 1);
    (c, streamed)
}

#[test]
fn sampling_is_reproducible_and_stops_where_asked() {
    let backend = CpuBackend::open(&common::fixture()).unwrap();
    let tok = Tokenizer::bundled();
    let sampled = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        seed: 11,
        max_tokens: 24,
        ..Default::default()
    };
    let (a, sa) = run(&backend, &tok, &sampled);
    let (b, _) = run(&backend, &tok, &sampled);
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    assert_eq!(a.finish, Finish::Length);
    assert_eq!(a.tokens.len(), 24);
    assert_eq!(sa, a.text, "the stream adds up to the text");
    let (c, _) = run(
        &backend,
        &tok,
        &SamplingParams {
            seed: 12,
            ..sampled.clone()
        },
    );
    assert_ne!(a.tokens, c.tokens, "another seed, other tokens");

    // A stop string taken from the middle of the greedy completion cuts it there.
    let greedy = SamplingParams {
        max_tokens: 24,
        ..Default::default()
    };
    let (g, _) = run(&backend, &tok, &greedy);
    let chars: Vec<char> = g.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = g.text.find(&stop).unwrap();
    let (s, streamed) = run(
        &backend,
        &tok,
        &SamplingParams {
            stop: vec![stop.clone()],
            ..greedy
        },
    );
    assert_eq!(s.finish, Finish::Stop);
    assert_eq!(s.text, g.text[..cut]);
    assert_eq!(
        streamed, s.text,
        "nothing past the stop string was streamed"
    );
    assert!(!streamed.contains(&stop));
}

#[test]
fn a_cancelled_generation_stops_at_once() {
    let backend = CpuBackend::open(&common::fixture()).unwrap();
    let tok = Tokenizer::bundled();
    let mut state = backend.new_state().unwrap();
    let mut calls = 0;
    let c = generate(
        &backend,
        &tok,
        &mut state,
        &[3, 4, 5],
        &SamplingParams {
            max_tokens: 50,
            ..Default::default()
        },
        Prefill {
            chunk: 8,
            progress: None,
        },
        |_| {
            calls += 1;
            false
        },
    )
    .unwrap();
    assert_eq!(c.finish, Finish::Cancelled);
    assert_eq!(calls, 1);
    assert!(c.tokens.len() < 50);
}

#[test]
fn greedy_speculative_decoding_equals_plain_greedy() {
    let backend = CpuBackend::open(&common::fixture()).unwrap();
    let tok = Tokenizer::bundled();
    let greedy = SamplingParams {
        max_tokens: 40,
        ..Default::default()
    };
    for (i, prompt) in [
        vec![0u32, 17, 300, 301, 5],
        (0..37).map(|i| (i * 53 % 1000) as u32).collect(),
    ]
    .iter()
    .enumerate()
    {
        let mut s1 = backend.new_state().unwrap();
        let plain = generate(
            &backend,
            &tok,
            &mut s1,
            prompt,
            &greedy,
            Prefill {
                chunk: 16,
                progress: None,
            },
            |_| true,
        )
        .unwrap();
        let mut s2 = backend.new_state().unwrap();
        let spec = hadal::generate::generate_speculative(
            &backend,
            &tok,
            &mut s2,
            prompt,
            &greedy,
            Prefill {
                chunk: 16,
                progress: None,
            },
            |_| true,
        )
        .unwrap();
        assert_eq!(spec.tokens, plain.tokens, "prompt {i}");
        assert_eq!(spec.text, plain.text);
        let (drafts, accepted) = spec.drafts;
        eprintln!("prompt {i}: {accepted}/{drafts} drafts accepted");
        assert!(drafts > 0 && accepted <= drafts);
    }
}

#[test]
fn a_rewound_state_continues_like_a_fresh_one() {
    let m = CpuBackend::open(&common::fixture()).unwrap();
    let run = |st: &mut Seq, t: &[u32]| {
        let h = m
            .forward(&mut [SeqInput {
                state: st,
                tokens: t,
            }])
            .unwrap();
        let rows: Vec<usize> = (0..t.len()).collect();
        m.logits(Head::Main, &h, &rows).unwrap()
    };
    let prefix: Vec<u32> = (0..130).map(|i| (i * 7 % 1000) as u32).collect();
    let mut a = m.new_state().unwrap();
    run(&mut a, &prefix);
    let mark = a.mark().unwrap();
    run(&mut a, &[9, 9, 9, 9, 9]);
    a.rewind(&mark).unwrap();
    let mut b = m.new_state().unwrap();
    run(&mut b, &prefix);
    assert_eq!(
        m.export_state(&a).unwrap(),
        m.export_state(&b).unwrap(),
        "rewinding restores the state exactly"
    );
    assert_eq!(run(&mut a, &[1, 2, 3]), run(&mut b, &[1, 2, 3]));
}
