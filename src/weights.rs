//! Weight matrices in their checkpoint precision.
//!
//! A [`Matrix`] is `rows x cols` (output x input, as `nn.Linear`) and borrows its bytes from
//! the checkpoint mapping. Each expert owns its own matrices, so experts can later be paged in
//! and out independently.

use safetensors::Dtype;

use crate::checkpoint::{Bytes, Checkpoint};
use crate::error::{Error, Result};
use crate::quant::{FP4_WEIGHT_BLOCK, FP8_WEIGHT_BLOCK};

/// Storage of one weight matrix.
#[derive(Clone)]
pub enum Storage {
    /// e4m3 bytes with one UE8M0 scale per 128x128 block.
    F8 {
        /// `rows x cols` codes.
        w: Bytes,
        /// `ceil(rows/128) x ceil(cols/128)` scale bytes.
        s: Bytes,
    },
    /// Packed e2m1 (low nibble = even column) with one UE8M0 scale per row and 32 columns.
    F4 {
        /// `rows x cols/2` bytes.
        w: Bytes,
        /// `rows x cols/32` scale bytes.
        s: Bytes,
    },
    /// BF16 values.
    Bf16(Bytes),
    /// BF16 values in tiles of `width` rows, each tile stored column by column: row `n`,
    /// column `c` at `((n / width) * cols + c) * width + n % width`. The CPU's layout for
    /// products summed in chain order, one output a lane (`Cpu::weight` makes it from `Bf16`):
    /// a column of a tile's outputs is then one sequential read, where row-major rows had to
    /// be transposed.
    Bf16Tiles {
        /// `rows x cols` values.
        w: Bytes,
        /// Rows a tile (a few times the SIMD lanes of the CPU that made it).
        width: usize,
    },
    /// F32 values.
    F32(Bytes),
}

/// A weight matrix, `rows x cols`.
#[derive(Clone)]
pub struct Matrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The bytes.
    pub storage: Storage,
}

impl Matrix {
    /// Loads `{prefix}.weight` (and `{prefix}.scale` for FP8/FP4) as a `rows x cols` matrix.
    /// `I8` weights are packed FP4; `F8_E4M3` weights are FP8; `BF16`/`F32` are plain.
    pub fn load(ck: &mut Checkpoint, prefix: &str, rows: usize, cols: usize) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        let w = ck.take(&wname)?;
        let sname = format!("{prefix}.scale");
        let scale = |ck: &mut Checkpoint, shape: [usize; 2]| -> Result<Bytes> {
            let s = ck.take(&sname)?;
            if s.dtype != Dtype::F8_E8M0 {
                return Err(Error::Checkpoint(format!(
                    "tensor {sname}: dtype {:?}, expected F8_E8M0",
                    s.dtype
                )));
            }
            s.expect_shape(&shape)?;
            Ok(s.data)
        };
        let storage = match w.dtype {
            Dtype::F8_E4M3 => {
                w.expect_shape(&[rows, cols])?;
                let s = scale(
                    ck,
                    [rows.div_ceil(FP8_WEIGHT_BLOCK), cols.div_ceil(FP8_WEIGHT_BLOCK)],
                )?;
                Storage::F8 { w: w.data, s }
            }
            Dtype::I8 | Dtype::U8 => {
                if !cols.is_multiple_of(FP4_WEIGHT_BLOCK) {
                    return Err(Error::Checkpoint(format!(
                        "tensor {wname}: FP4 input width {cols} is not a multiple of {FP4_WEIGHT_BLOCK}"
                    )));
                }
                w.expect_shape(&[rows, cols / 2])?;
                let s = scale(ck, [rows, cols / FP4_WEIGHT_BLOCK])?;
                Storage::F4 { w: w.data, s }
            }
            Dtype::BF16 => {
                w.expect_shape(&[rows, cols])?;
                Storage::Bf16(w.data)
            }
            Dtype::F32 => {
                w.expect_shape(&[rows, cols])?;
                Storage::F32(w.data)
            }
            other => {
                return Err(Error::Checkpoint(format!(
                    "tensor {wname}: dtype {other:?} is not a weight format (F8_E4M3, I8 packed FP4, BF16, F32)"
                )))
            }
        };
        Ok(Matrix {
            rows,
            cols,
            storage,
        })
    }

    /// Whether activations entering this matrix are FP8-quantized first (FP8/FP4 weights).
    pub fn quantized(&self) -> bool {
        matches!(self.storage, Storage::F8 { .. } | Storage::F4 { .. })
    }

    /// Bytes held, scales included.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F8 { w, s } | Storage::F4 { w, s } => w.len() + s.len(),
            Storage::Bf16(w) | Storage::Bf16Tiles { w, .. } | Storage::F32(w) => w.len(),
        }
    }

    /// Short name of the storage format.
    pub fn format(&self) -> &'static str {
        match self.storage {
            Storage::F8 { .. } => "FP8",
            Storage::F4 { .. } => "FP4",
            Storage::Bf16(_) | Storage::Bf16Tiles { .. } => "BF16",
            Storage::F32(_) => "F32",
        }
    }

    /// Makes synthetic bytes (a checkpoint generated in place) exist in host memory; others
    /// are there (or mapped) already.
    pub fn materialize(&self) {
        match &self.storage {
            Storage::F8 { w, s } | Storage::F4 { w, s } => {
                let _ = (&w[..], &s[..]);
            }
            Storage::Bf16(w) | Storage::Bf16Tiles { w, .. } | Storage::F32(w) => {
                let _ = &w[..];
            }
        }
    }

    /// Decodes row `r` to f32 (scales applied).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        crate::backend::cpu::decode_row(self, r, out);
    }
}
