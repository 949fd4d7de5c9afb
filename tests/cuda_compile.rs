//! Every CUDA kernel compiles with NVRTC for Hopper (sm_90), on any machine: the
//! `nvidia-cuda-nvrtc` wheel of `tests/requirements.txt` provides the compiler, no GPU needed.

use hadal::backend::cuda::kernels;

#[test]
fn every_kernel_compiles_for_sm90() {
    let cubin = kernels::compile((9, 0)).unwrap_or_else(|e| panic!("{e}"));
    assert!(cubin.starts_with(b"\x7fELF"), "NVRTC returned no cubin");
    // Every kernel the backend launches is in it, under its name.
    let missing: Vec<&str> = kernels::NAMES
        .iter()
        .copied()
        .filter(|n| {
            let sym = format!("{n}\0");
            !cubin.windows(sym.len()).any(|w| w == sym.as_bytes())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "kernels missing from the cubin: {missing:?}"
    );
    eprintln!(
        "{} kernels compiled for sm_90: {} bytes of machine code (NVRTC {:?})",
        kernels::NAMES.len(),
        cubin.len(),
        kernels::nvrtc_version().unwrap()
    );
}
