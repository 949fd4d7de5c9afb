//! Memory-mapped safetensors checkpoints, single-file or sharded through
//! `model.safetensors.index.json`.
//!
//! Tensors are borrowed from the mapping, never copied: an FP8 weight stays e4m3 bytes and an FP4
//! expert stays packed, so resident weight memory is the checkpoint's size. Loading takes each
//! tensor by name with its expected dtype and shape; whatever is missing, extra, mistyped,
//! misshapen or truncated is an error naming the tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Bytes that live in a file mapping, in memory, or nowhere yet (synthetic weights, generated
/// where they are used).
enum Backing {
    Map(Mmap),
    Owned(Vec<u8>),
    Synthetic(Fill, OnceLock<Vec<u8>>),
}

/// How synthetic bytes are generated: byte `i` is a function of `seed` and `i` alone
/// ([`Fill::byte`]), so that every device generates the same weights in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Total bytes.
    pub len: usize,
    /// The tensor's seed.
    pub seed: u64,
    /// What the bytes are.
    pub kind: FillKind,
    /// Scales: the smallest biased exponent; values: the exponent of their bound.
    pub lo: i32,
    /// Scales: how many exponents from `lo` on.
    pub span: u32,
}

/// What synthetic bytes encode (the numbering is the `fill_random` kernel's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillKind {
    /// Any byte (packed FP4 pairs).
    Any = 0,
    /// e4m3 codes, NaN excepted.
    E4m3 = 1,
    /// UE8M0 scales `2^(lo - 127 + r)`, `r < span`.
    Scale = 2,
    /// BF16 values uniform in `(-2^lo, 2^lo)`.
    Bf16 = 3,
    /// F32 values uniform in `(-2^lo, 2^lo)`.
    F32 = 4,
}

/// SplitMix64's finalizer.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Fill {
    /// The random word behind byte `i`.
    fn word(&self, i: usize) -> u64 {
        splitmix(self.seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    /// A value in `(-2^lo, 2^lo)` from element `e`'s word.
    fn value(&self, e: usize, lo: i32) -> f32 {
        let r = self.word(e);
        (((r >> 8) & 0xffff) as f32 / 65536.0 * 2.0 - 1.0) * crate::quant::pow2(lo)
    }

    /// All bytes, generated in parallel.
    pub fn generate(&self) -> Vec<u8> {
        use rayon::prelude::*;
        let (lo, span) = (self.lo, self.span);
        let mut out = vec![0u8; self.len];
        match self.kind {
            FillKind::Bf16 => out.par_chunks_mut(2).enumerate().for_each(|(j, c)| {
                let b = ((self.value(2 * j, lo).to_bits() >> 16) as u16).to_le_bytes();
                c.copy_from_slice(&b[..c.len()]);
            }),
            FillKind::F32 => out.par_chunks_mut(4).enumerate().for_each(|(j, c)| {
                let b = self.value(4 * j, lo).to_le_bytes();
                c.copy_from_slice(&b[..c.len()]);
            }),
            _ => out.par_iter_mut().enumerate().for_each(|(i, o)| {
                let r = self.word(i);
                let b = (r & 0xff) as u8;
                *o = match self.kind {
                    FillKind::E4m3 if b & 0x7f == 0x7f => b - 1,
                    FillKind::Scale => (lo as u32 + (r % span.max(1) as u64) as u32) as u8,
                    _ => b,
                };
            }),
        }
        out
    }
}

/// A shared, immutable byte range of a mapped file or buffer.
#[derive(Clone)]
pub struct Bytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

impl Bytes {
    /// Synthetic bytes, made on the host only if something reads them there.
    pub fn synthetic(fill: Fill) -> Self {
        Bytes {
            backing: Arc::new(Backing::Synthetic(fill, OnceLock::new())),
            start: 0,
            len: fill.len,
        }
    }

    /// The recipe of synthetic bytes.
    pub fn recipe(&self) -> Option<Fill> {
        match &*self.backing {
            Backing::Synthetic(f, _) => Some(*f),
            _ => None,
        }
    }

    /// Its length (synthetic bytes are not made for it: `[u8]::len` through `Deref` would).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Wraps owned bytes.
    pub fn owned(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes {
            backing: Arc::new(Backing::Owned(v)),
            start: 0,
            len,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &*self.backing {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
            Backing::Synthetic(f, cell) => return cell.get_or_init(|| f.generate()),
        };
        &all[self.start..self.start + self.len]
    }
}

/// One tensor of a checkpoint: its dtype, shape and raw little-endian bytes.
#[derive(Clone)]
pub struct RawTensor {
    /// Canonical name.
    pub name: String,
    /// Storage dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Raw data.
    pub data: Bytes,
}

impl RawTensor {
    /// An F32 tensor from values.
    pub fn f32(name: &str, shape: &[usize], v: &[f32]) -> Self {
        RawTensor {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: Bytes::owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor converted to f32 (for small parameters: norms, biases, mHC, `ape`).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = &self.data;
        Ok(match self.dtype {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| crate::quant::bf16(c[0], c[1]))
                .collect(),
            other => {
                return Err(Error::Checkpoint(format!(
                    "tensor {}: dtype {other:?} where a float tensor (F32/BF16) was expected",
                    self.name
                )))
            }
        })
    }

    /// The tensor as integers (`tid2eid`).
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let d = &self.data;
        Ok(match self.dtype {
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            other => {
                return Err(Error::Checkpoint(format!(
                    "tensor {}: dtype {other:?} where I32/I64 was expected",
                    self.name
                )))
            }
        })
    }

    /// Checks the shape.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::Checkpoint(format!(
                "tensor {}: shape {:?}, expected {:?} from config.json",
                self.name, self.shape, shape
            )));
        }
        Ok(())
    }
}

/// What tells one model from another: its configuration and every tensor's name, dtype, shape
/// and a sample of its bytes, hashed with SHA-256. A base model and its instruct model share a
/// configuration and shapes but not their bytes; the sample reads a few pages of each tensor,
/// not the whole checkpoint. Decode states saved to disk carry it, and are refused by a model
/// with another.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Input(format!("{s:?} is not a model fingerprint (64 hex digits)"));
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// Bytes of each sampled window of a tensor, and windows per tensor.
const SAMPLE_BYTES: usize = 64;
const SAMPLES: usize = 4;

/// The tensors of a checkpoint, taken one by one while the model is built.
pub struct Checkpoint {
    tensors: BTreeMap<String, RawTensor>,
    taken: BTreeSet<String>,
    /// Total bytes of tensor data.
    pub bytes: u64,
}

/// Maps the names of a Hugging Face export onto the reference's names (which the released V4
/// checkpoints use as is).
fn canonical_name(name: &str) -> String {
    let n = name.strip_prefix("model.").unwrap_or(name);
    n.replace(".self_attn.", ".attn.")
        .replace(".mlp.", ".ffn.")
        .replace("weight_scale_inv", "scale")
        .replace("e_score_correction_bias", "bias")
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only; a checkpoint rewritten while being served is outside
    // what any inference engine can defend against.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Names the first tensor that a truncated file cuts off, from its raw header.
fn truncated_tensor(buf: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    let avail = buf.len().saturating_sub(8 + n);
    header.as_object()?.iter().find_map(|(k, v)| {
        let end = v.get("data_offsets")?.get(1)?.as_u64()? as usize;
        (end > avail).then(|| k.clone())
    })
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` with its shards, or
    /// `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut ck = Checkpoint {
            tensors: BTreeMap::new(),
            taken: BTreeSet::new(),
            bytes: 0,
        };
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Checkpoint(format!("{}: not JSON: {e}", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Checkpoint(format!("{}: no `weight_map` object", index.display()))
                })?;
            let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::Checkpoint(format!(
                        "{}: weight_map[{name}] is not a file name",
                        index.display()
                    ))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(Error::Checkpoint(format!(
                        "{}: weight_map[{name}] = {file:?} is not a plain file name",
                        index.display()
                    )));
                }
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .insert(name.clone());
            }
            for (file, names) in by_file {
                let path = dir.join(&file);
                let found = ck.add_file(&path)?;
                for n in &names {
                    if !found.contains(n) {
                        return Err(Error::Checkpoint(format!(
                            "tensor {n}: listed in the index under {file} but absent from that file"
                        )));
                    }
                }
                if let Some(extra) = found.iter().find(|n| !names.contains(*n)) {
                    return Err(Error::Checkpoint(format!(
                        "tensor {extra}: in {file} but not listed in model.safetensors.index.json"
                    )));
                }
            }
        } else if single.exists() {
            ck.add_file(&single)?;
        } else {
            return Err(Error::Checkpoint(format!(
                "{}: neither model.safetensors.index.json nor model.safetensors found",
                dir.display()
            )));
        }
        Ok(ck)
    }

    /// Maps one safetensors file and registers its tensors; returns their names as stored.
    fn add_file(&mut self, path: &Path) -> Result<BTreeSet<String>> {
        let map = map_file(path)?;
        let (n, meta) = match SafeTensors::read_metadata(&map) {
            Ok(x) => x,
            Err(e) => {
                let what = truncated_tensor(&map)
                    .map(|t| format!("tensor {t} is truncated (file ends early)"))
                    .unwrap_or_else(|| e.to_string());
                return Err(Error::Checkpoint(format!("{}: {what}", path.display())));
            }
        };
        let backing = Arc::new(Backing::Map(map));
        let mut names = BTreeSet::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            let canon = canonical_name(&name);
            let t = RawTensor {
                name: canon.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: Bytes {
                    backing: backing.clone(),
                    start: 8 + n + s,
                    len: e - s,
                },
            };
            self.bytes += (e - s) as u64;
            if self.tensors.insert(canon.clone(), t).is_some() {
                return Err(Error::Checkpoint(format!(
                    "tensor {canon}: stored twice (second copy in {})",
                    path.display()
                )));
            }
            names.insert(name);
        }
        Ok(names)
    }

    /// Builds a checkpoint from in-memory tensors (tests, generated models).
    pub fn from_tensors(tensors: Vec<RawTensor>) -> Self {
        let bytes = tensors.iter().map(|t| t.data.len() as u64).sum();
        Checkpoint {
            tensors: tensors.into_iter().map(|t| (t.name.clone(), t)).collect(),
            taken: BTreeSet::new(),
            bytes,
        }
    }

    /// Takes (and drops) every tensor of main blocks from `n` on and of MTP blocks: what a
    /// model cut to its first `n` layers does not use.
    pub fn drop_layers_from(&mut self, n: usize) {
        for name in self.names() {
            let layer = name
                .strip_prefix("layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            if name.starts_with("mtp.") || layer.is_some_and(|i| i >= n) {
                let _ = self.take(&name);
            }
        }
    }

    /// The [`Fingerprint`] of this checkpoint (the tensors not yet taken) under `config`
    /// (its `config.json` as parsed). Synthetic tensors contribute their recipe, so that
    /// fingerprinting them generates nothing.
    pub fn fingerprint(&self, config: &impl serde::Serialize) -> Fingerprint {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"hadal model fingerprint 1\0");
        h.update(serde_json::to_vec(config).unwrap_or_default());
        for (name, t) in &self.tensors {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(format!("{:?} {:?} {}", t.dtype, t.shape, t.data.len()).as_bytes());
            match t.data.recipe() {
                Some(fill) => h.update(format!("{fill:?}").as_bytes()),
                None => {
                    let n = t.data.len();
                    let w = SAMPLE_BYTES.min(n);
                    for i in 0..SAMPLES {
                        let at = (n - w) * i / (SAMPLES - 1);
                        h.update(&t.data[at..at + w]);
                    }
                }
            }
        }
        Fingerprint(h.finalize().into())
    }

    /// Each tensor not yet taken, with its bytes (nothing is read or generated).
    pub fn sizes(&self) -> impl Iterator<Item = (&str, u64)> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.data.len() as u64))
    }

    /// Names of the tensors not yet taken.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Whether a tensor exists (and has not been taken).
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes a tensor by name.
    pub fn take(&mut self, name: &str) -> Result<RawTensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::Checkpoint(format!("tensor {name}: missing")))?;
        self.taken.insert(name.to_string());
        Ok(t)
    }

    /// Takes a float parameter of the given shape, converted to f32.
    pub fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.take(name)?;
        t.expect_shape(shape)?;
        t.to_f32()
    }

    /// Fails if any tensor was not used by the model.
    pub fn finish(self) -> Result<()> {
        if let Some((name, t)) = self.tensors.iter().next() {
            let more = self.tensors.len() - 1;
            return Err(Error::Checkpoint(format!(
                "tensor {name} ({:?} {:?}) is not part of the model described by config.json{}",
                t.dtype,
                t.shape,
                if more > 0 {
                    format!(" (and {more} more unexpected tensors)")
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }

    /// Path of `config.json` beside the weights.
    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("config.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_are_canonicalized() {
        assert_eq!(
            canonical_name("model.layers.3.self_attn.wq_a.weight_scale_inv"),
            "layers.3.attn.wq_a.scale"
        );
        assert_eq!(
            canonical_name("model.layers.3.mlp.gate.e_score_correction_bias"),
            "layers.3.ffn.gate.bias"
        );
        assert_eq!(
            canonical_name("layers.0.attn.wkv.weight"),
            "layers.0.attn.wkv.weight"
        );
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
        let mut buf = (header.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(header);
        buf.extend_from_slice(&[0u8; 12]);
        assert_eq!(truncated_tensor(&buf).as_deref(), Some("b"));
    }
}
