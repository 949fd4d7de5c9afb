//! Teacher-forced scoring: how a user checks a conversion or a quantization against a reference.
//!
//! Each sequence is fed in a schedule of chunks (by default one prefill, then one token at a
//! time) with its own tokens, all sequences batched together at every step; the logits of every
//! position are kept. MTP logits are taken over the prefill, as the reference's `mtp_logits`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::backend::{Backend, Head, Hidden, SeqInput};
use crate::error::{Error, Result};

/// Logits of a scored batch.
pub struct Scores {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub len: usize,
    /// Tokens of the first chunk.
    pub prefill: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// `batch x len x vocab`.
    pub logits: Vec<f32>,
    /// `batch x (prefill - 1) x vocab`, when asked for.
    pub mtp_logits: Option<Vec<f32>>,
}

/// Scores equal-length sequences: a prompt prefilled in chunks of `chunks[0]`, `chunks[1]`, ...
/// tokens, then one-token decode steps to the end. With `mtp`, MTP block 0 is run over the
/// first chunk.
pub fn score(
    backend: &dyn Backend,
    seqs: &[Vec<u32>],
    chunks: &[usize],
    mtp: bool,
) -> Result<Scores> {
    let (b, n) = (seqs.len(), seqs.first().map_or(0, Vec::len));
    if b == 0 || n == 0 {
        return Err(Error::Input("no tokens to score".into()));
    }
    if seqs.iter().any(|s| s.len() != n) {
        return Err(Error::Input(
            "all sequences must have the same length".into(),
        ));
    }
    let scheduled: usize = chunks.iter().sum();
    if chunks.contains(&0) || scheduled > n {
        return Err(Error::Input(format!(
            "chunk schedule {chunks:?} does not fit {n} tokens (chunks must be positive and sum to at most {n})"
        )));
    }
    let mut sizes = chunks.to_vec();
    sizes.extend(std::iter::repeat_n(1, n - scheduled));
    let prefill = sizes[0];
    if mtp && prefill < 2 {
        return Err(Error::Input(
            "MTP scoring needs a prefill of at least 2 tokens".into(),
        ));
    }
    let cfg = backend.config();
    let v = cfg.vocab_size;
    let mut states = (0..b)
        .map(|_| backend.new_state())
        .collect::<Result<Vec<_>>>()?;
    // The scheduled chunks are one prompt: ranked as if prefilled at once.
    states.iter_mut().for_each(|s| s.set_prompt_end(scheduled));
    let mut logits = vec![0f32; b * n * v];
    let mut mtp_logits = None;
    let mut pos = 0;
    for len in sizes {
        let mut inputs: Vec<SeqInput> = states
            .iter_mut()
            .zip(seqs)
            .map(|(state, s)| SeqInput {
                state,
                tokens: &s[pos..pos + len],
            })
            .collect();
        let hidden = backend.forward(&mut inputs)?;
        let rows: Vec<usize> = (0..b * len).collect();
        let l = backend.logits(Head::Main, &hidden, &rows)?;
        for i in 0..b {
            logits[(i * n + pos) * v..(i * n + pos + len) * v]
                .copy_from_slice(&l[i * len * v..(i + 1) * len * v]);
        }
        if mtp && pos == 0 {
            mtp_logits = Some(mtp_over_prefill(backend, seqs, &hidden, len)?);
        }
        pos += len;
    }
    Ok(Scores {
        batch: b,
        len: n,
        prefill,
        vocab: v,
        logits,
        mtp_logits,
    })
}

/// MTP block 0 over positions `0..p-1` of each sequence, fed tokens `1..p`.
fn mtp_over_prefill(
    backend: &dyn Backend,
    seqs: &[Vec<u32>],
    hidden: &Hidden,
    p: usize,
) -> Result<Vec<f32>> {
    let parts: Vec<_> = (0..seqs.len())
        .map(|i| (hidden, i * p..i * p + p - 1))
        .collect();
    let h = backend.select(&parts)?;
    let mut states = seqs
        .iter()
        .map(|_| backend.new_mtp_state(0))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<SeqInput> = states
        .iter_mut()
        .zip(seqs)
        .map(|(state, s)| SeqInput {
            state,
            tokens: &s[1..p],
        })
        .collect();
    let out = backend.mtp_forward(0, &h, &mut inputs)?;
    let rows: Vec<usize> = (0..seqs.len() * (p - 1)).collect();
    backend.logits(Head::Mtp(0), &out, &rows)
}

/// Perplexity of one sequence: `exp(mean(-log p(token_t | tokens_<t)))` over tokens 1..N,
/// from one prefill of the whole sequence.
pub fn perplexity(backend: &dyn Backend, tokens: &[u32]) -> Result<f64> {
    if tokens.len() < 2 {
        return Err(Error::Input("perplexity needs at least 2 tokens".into()));
    }
    let s = score(backend, &[tokens.to_vec()], &[tokens.len()], false)?;
    let v = s.vocab;
    let nll: f64 = (1..tokens.len())
        .map(|t| {
            let row = &s.logits[(t - 1) * v..t * v];
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
            lse - row[tokens[t] as usize] as f64
        })
        .sum();
    Ok((nll / (tokens.len() - 1) as f64).exp())
}

/// Reads `tokens` (I32 or I64, `[B, N]`) from a safetensors file.
pub fn read_tokens(path: &Path) -> Result<Vec<Vec<u32>>> {
    let buf = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&buf)
        .map_err(|e| Error::Input(format!("{}: not a safetensors file: {e}", path.display())))?;
    let t = st
        .tensor("tokens")
        .map_err(|_| Error::Input(format!("{}: no tensor named `tokens`", path.display())))?;
    let shape = t.shape();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        return Err(Error::Input(format!(
            "{}: `tokens` has shape {shape:?}; expected [batch, length] with both positive",
            path.display()
        )));
    }
    let ids: Vec<i64> = match t.dtype() {
        Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => {
            return Err(Error::Input(format!(
                "{}: `tokens` is {other:?}; expected I32 or I64",
                path.display()
            )))
        }
    };
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i > u32::MAX as i64) {
        return Err(Error::Input(format!(
            "{}: token id {bad} is not valid",
            path.display()
        )));
    }
    Ok(ids
        .chunks(shape[1])
        .map(|c| c.iter().map(|&i| i as u32).collect())
        .collect())
}

/// Writes `logits` (and `mtp_logits`) to a safetensors file, atomically: a failure leaves no
/// partial file behind.
pub fn write_scores(path: &Path, s: &Scores) -> Result<()> {
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let logits = bytes(&s.logits);
    let mtp = s.mtp_logits.as_deref().map(bytes);
    fn view(data: &[u8], shape: Vec<usize>) -> Result<TensorView<'_>> {
        TensorView::new(Dtype::F32, shape, data)
            .map_err(|e| Error::Input(format!("cannot serialize logits: {e}")))
    }
    let mut tensors = vec![(
        "logits".to_string(),
        view(&logits, vec![s.batch, s.len, s.vocab])?,
    )];
    if let Some(m) = &mtp {
        tensors.push((
            "mtp_logits".to_string(),
            view(m, vec![s.batch, s.prefill - 1, s.vocab])?,
        ));
    }
    let meta: HashMap<String, String> = [("prefill".to_string(), s.prefill.to_string())].into();
    let tmp = path.with_file_name(format!(
        ".{}.partial-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let data = safetensors::serialize(tensors, Some(meta))
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    let written = std::fs::write(&tmp, data)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
