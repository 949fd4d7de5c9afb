//! hadal's top-k against `torch.topk` on the CPU (the reference's), on rows full of ties: the
//! same entries, in the same order. Cases from `tools/reference/make_topk_cases.py`.

mod common;

use hadal::backend::cpu::top_k;

#[test]
fn picks_what_torch_picks() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/topk_torch.safetensors");
    let t = common::read(&path);
    let words = |name: &str| -> Vec<[u8; 4]> {
        t[name]
            .2
            .chunks_exact(4)
            .map(|b| b.try_into().unwrap())
            .collect()
    };
    let values: Vec<f32> = words("values")
        .into_iter()
        .map(f32::from_le_bytes)
        .collect();
    let ints = |name: &str| -> Vec<usize> {
        words(name)
            .into_iter()
            .map(|b| i32::from_le_bytes(b) as usize)
            .collect()
    };
    let (lens, ks, picks) = (ints("lens"), ints("k"), ints("picks"));
    let (mut v0, mut p0, mut wrong) = (0, 0, Vec::new());
    for (&n, &k) in lens.iter().zip(&ks) {
        let got = top_k(&values[v0..v0 + n], k);
        let want = &picks[p0..p0 + k];
        if got != want {
            wrong.push(format!("n {n} k {k}: {got:?} vs torch {want:?}"));
        }
        v0 += n;
        p0 += k;
    }
    assert_eq!(v0, values.len());
    assert!(
        wrong.is_empty(),
        "{} of {} rows differ, e.g. {}",
        wrong.len(),
        lens.len(),
        wrong[0]
    );
}
