//! Helpers shared by integration tests: the bundled fixture and ways to damage a copy of it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The bundled tiny-a checkpoint.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a")
}

/// A tensor to write: dtype, shape, bytes.
pub type Raw = (Dtype, Vec<usize>, Vec<u8>);

/// The tensors of a safetensors file, by name.
pub fn read(path: &Path) -> BTreeMap<String, Raw> {
    let buf = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

/// Writes tensors to a safetensors file.
pub fn write(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A copy of the fixture's config and weights in a fresh directory, with `edit` applied to the
/// tensors.
pub fn damaged(edit: impl FnOnce(&mut BTreeMap<String, Raw>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut t = read(&fixture().join("model.safetensors"));
    edit(&mut t);
    write(&dir.path().join("model.safetensors"), &t);
    dir
}
