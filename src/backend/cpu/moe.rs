//! The router and the routed experts on the CPU.

use rayon::prelude::*;

use super::{linear, ops, ops::silu, top_k, Cpu, Numerics};
use crate::config::ScoringFunc;
use crate::model::moe::{Expert, Moe, Routing};

/// `silu(min(g, L)) * clamp(u, -L, L)` (no clamp when `limit` is 0).
pub fn swiglu(gate: &[f32], up: &[f32], limit: f32) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let (g, u) = if limit > 0.0 {
                (g.min(limit), u.clamp(-limit, limit))
            } else {
                (g, u)
            };
            silu(g) * u
        })
        .collect()
}

/// Experts and routing weights for each of `T` tokens (`T x topk` each) from gate logits.
pub fn route(m: &Moe<Cpu>, tokens: &[u32], mut scores: Vec<f32>) -> (Vec<usize>, Vec<f32>) {
    let e = m.experts.len();
    for row in scores.chunks_mut(e) {
        match m.func {
            ScoringFunc::Sqrtsoftplus => row.iter_mut().for_each(|v| *v = ops::softplus(*v).sqrt()),
            ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = ops::sigmoid_vec(*v)),
            ScoringFunc::Softmax => ops::softmax(row),
        }
    }
    let k = m.topk;
    let mut ids = Vec::with_capacity(tokens.len() * k);
    let mut ws = Vec::with_capacity(tokens.len() * k);
    for (t, row) in scores.chunks(e).enumerate() {
        let pick: Vec<usize> = match &m.routing {
            Routing::Hash(map) => map[tokens[t] as usize * k..(tokens[t] as usize + 1) * k]
                .iter()
                .map(|&i| i as usize)
                .collect(),
            Routing::Score(bias) => {
                let biased: Vec<f32> = row.iter().zip(bias).map(|(s, b)| s + b).collect();
                top_k(&biased, k)
            }
        };
        let mut w: Vec<f32> = pick.iter().map(|&i| row[i]).collect();
        if m.func != ScoringFunc::Softmax {
            let s: f32 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= s);
        }
        w.iter_mut().for_each(|v| *v *= m.scale);
        ids.extend(pick);
        ws.extend(w);
    }
    (ids, ws)
}

/// One routed expert over `rows x D` inputs, each row's SwiGLU output scaled by its weight
/// before `w2`.
fn expert(e: &Expert<Cpu>, x: &[f32], weights: &[f32], limit: f32, num: Numerics) -> Vec<f32> {
    let gate = linear(&e.w1, x, num);
    let up = linear(&e.w3, x, num);
    let mut h = swiglu(&gate, &up, limit);
    for (row, &w) in h.chunks_mut(e.w1.rows).zip(weights) {
        row.iter_mut().for_each(|v| *v *= w);
    }
    linear(&e.w2, &h, num)
}

/// The sum of each token's routed experts, added in ascending expert order as the reference
/// accumulates them.
pub fn experts(m: &Moe<Cpu>, route: &(Vec<usize>, Vec<f32>), y: &[f32], num: Numerics) -> Vec<f32> {
    routed_experts(&m.experts, m.limit, m.topk, (&route.0, &route.1), y, num)
}

/// [`experts`] from the experts themselves, their SwiGLU clamp `limit`, `k` experts a token,
/// and each token's expert ids and weights (`T x k`) for the `T x D` rows `y`.
pub fn routed_experts(
    experts: &[Expert<Cpu>],
    limit: f32,
    k: usize,
    (ids, ws): (&[usize], &[f32]),
    y: &[f32],
    num: Numerics,
) -> Vec<f32> {
    let d = experts.first().map_or(0, |e| e.w2.rows);
    let mut out = vec![0f32; y.len()];
    let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts.len()];
    for (i, (&e, &w)) in ids.iter().zip(ws).enumerate() {
        by_expert[e].push((i / k, w));
    }
    // The experts side by side (a one-token step's six products of a few MiB each keep the
    // threads busier together than one after another), their sums added in expert order.
    let sums: Vec<Vec<f32>> = by_expert
        .par_iter()
        .enumerate()
        .map(|(e, rows)| {
            if rows.is_empty() {
                return Vec::new();
            }
            let x: Vec<f32> = rows
                .iter()
                .flat_map(|&(t, _)| &y[t * d..(t + 1) * d])
                .copied()
                .collect();
            let w: Vec<f32> = rows.iter().map(|&(_, w)| w).collect();
            expert(&experts[e], &x, &w, limit, num)
        })
        .collect();
    for (rows, r) in by_expert.iter().zip(&sums) {
        for (&(t, _), rr) in rows.iter().zip(r.chunks(d)) {
            for (o, v) in out[t * d..(t + 1) * d].iter_mut().zip(rr) {
                *o += v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::linear_plain;
    use crate::backend::Device;
    use crate::checkpoint::{Checkpoint, RawTensor};
    use crate::config::Config;
    use crate::model::Loader;

    const D: usize = 128;
    const F: usize = 128;
    const NUM: Numerics = Numerics::BatchInvariant;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2246822519).wrapping_add(seed) >> 9) % 997) as f32
                    / 4000.0
                    - 0.12
            })
            .collect()
    }

    fn moe(hash: bool) -> Moe<Cpu> {
        let mut cfg =
            Config::from_json(include_str!("../../../tests/fixtures/tiny-a/config.json")).unwrap();
        (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
        ) = (D, F, 4, 2);
        (cfg.vocab_size, cfg.routed_scaling_factor, cfg.swiglu_limit) = (3, 1.5, 0.5);
        let mut t = vec![RawTensor::f32("m.gate.weight", &[4, D], &values(4 * D, 1))];
        if hash {
            let ids: Vec<u8> = [3i32, 1, 0, 2, 2, 2]
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect();
            let mut r = RawTensor::f32("m.gate.tid2eid", &[3, 2], &[0.0; 6]);
            (r.dtype, r.data) = (
                safetensors::Dtype::I32,
                crate::checkpoint::Bytes::owned(ids),
            );
            t.push(r);
        } else {
            t.push(RawTensor::f32("m.gate.bias", &[4], &[0.0, 0.0, 10.0, 0.0]));
        }
        for (e, p) in (0..4)
            .map(|e| (e, format!("m.experts.{e}")))
            .chain([(4, "m.shared_experts".to_string())])
        {
            for (w, shape) in [("w1", [F, D]), ("w2", [D, F]), ("w3", [F, D])] {
                t.push(RawTensor::f32(
                    &format!("{p}.{w}.weight"),
                    &shape,
                    &values(F * D, 10 + e as u32),
                ));
            }
        }
        let dev = Cpu::default();
        let mut l = Loader::new(&dev, Checkpoint::from_tensors(t));
        let m = Moe::load(&mut l, "m", &cfg, 0, hash).unwrap();
        l.ck.finish().unwrap();
        m
    }

    fn gate_logits(y: &[f32]) -> Vec<f32> {
        let g = crate::weights::Matrix {
            rows: 4,
            cols: D,
            storage: crate::weights::Storage::F32(crate::checkpoint::Bytes::owned(
                values(4 * D, 1)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            )),
        };
        linear_plain(&g, y, NUM)
    }

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let m = moe(false);
        let y = values(D, 7);
        let logits = gate_logits(&y);
        let (ids, ws) = route(&m, &[0], logits.clone());
        // Expert 2 has a large selection bias, so it is always picked ...
        assert!(ids.contains(&2), "{ids:?}");
        // ... but the weights are its unbiased scores, normalized, times the scaling factor.
        let s: Vec<f32> = logits.iter().map(|&l| ops::softplus(l).sqrt()).collect();
        let sum: f32 = ids.iter().map(|&i| s[i]).sum();
        for (&i, &w) in ids.iter().zip(&ws) {
            assert!((w - s[i] / sum * 1.5).abs() < 1e-6);
        }
    }

    #[test]
    fn hash_layers_route_by_token_id() {
        let m = moe(true);
        let y = values(3 * D, 5);
        let (ids, ws) = route(&m, &[0, 1, 2], gate_logits(&y));
        assert_eq!(ids, vec![3, 1, 0, 2, 2, 2]);
        assert!((ws[4] + ws[5] - 1.5).abs() < 1e-6);
    }

    #[test]
    fn output_sums_routed_experts_in_order() {
        let m = moe(true);
        let y = values(2 * D, 3);
        let r = route(&m, &[0, 1], gate_logits(&y));
        let out = experts(&m, &r, &y, NUM);
        let (ids, ws) = &r;
        for t in 0..2 {
            let x = &y[t * D..(t + 1) * D];
            let mut pairs: Vec<(usize, f32)> =
                (0..2).map(|j| (ids[t * 2 + j], ws[t * 2 + j])).collect();
            pairs.sort_by_key(|p| p.0);
            let mut want = vec![0f32; D];
            for (e, w) in pairs {
                let r = expert(&m.experts[e], x, &[w], m.limit, NUM);
                want.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
            }
            assert_eq!(&out[t * D..(t + 1) * D], &want[..]);
        }
    }

    #[test]
    fn swiglu_clamps_gate_and_up() {
        let m = moe(true);
        let dev = Cpu::default();
        let e = &m.experts[0];
        let x = values(D, 2);
        let g = linear_plain(&e.w1, &x, NUM);
        let u = linear_plain(&e.w3, &x, NUM);
        let h: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| silu(g.min(0.5)) * u.clamp(-0.5, 0.5))
            .collect();
        assert_eq!(
            e.forward(&dev, &x, 0.5).unwrap(),
            dev.linear(&e.w2, &h).unwrap()
        );
    }
}
