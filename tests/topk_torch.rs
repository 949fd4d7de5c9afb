//! hadal's top-k against `torch.topk` on the CPU (the reference's), on rows full of ties: the
//! same entries, in the same order. Cases from `tools/reference/make_topk_cases.py`.

use hadal::backend::cpu::top_k;
use safetensors::SafeTensors;

fn column<T: Copy>(st: &SafeTensors, name: &str, from: fn([u8; 4]) -> T) -> Vec<T> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| from(b.try_into().unwrap()))
        .collect()
}

#[test]
fn picks_what_torch_picks() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/topk_torch.safetensors"
    );
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let values = column(&st, "values", f32::from_le_bytes);
    let lens = column(&st, "lens", i32::from_le_bytes);
    let ks = column(&st, "k", i32::from_le_bytes);
    let picks = column(&st, "picks", i32::from_le_bytes);
    let (mut v0, mut p0, mut wrong) = (0, 0, Vec::new());
    for (&n, &k) in lens.iter().zip(&ks) {
        let (n, k) = (n as usize, k as usize);
        let row = &values[v0..v0 + n];
        let want: Vec<usize> = picks[p0..p0 + k].iter().map(|&i| i as usize).collect();
        if top_k(row, k) != want {
            wrong.push(format!(
                "n {n} k {k}: {:?} vs torch {want:?}",
                top_k(row, k)
            ));
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
