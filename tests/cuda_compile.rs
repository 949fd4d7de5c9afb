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

/// Prefixes of the kernels held to no spills.
const HOT: [&str; 8] = [
    "mma_",
    "tile_",
    "gemv_",
    "attend",
    "index_scores",
    "index_topk",
    "topk_",
    "hc_",
];

/// The kernels every weight byte or state row passes through keep everything in registers on
/// Hopper (a spill would put per-lane values in local memory, on that path); the older
/// architecture's conversion path (sm_80) compiles too.
#[test]
fn hot_kernels_do_not_spill() {
    let log = kernels::resources((9, 0)).unwrap_or_else(|e| panic!("{e}"));
    let mut current = String::new();
    let mut checked = 0;
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            current = rest.split('\'').next().unwrap_or("").to_string();
        }
        // A callee's own report (the double-precision sine's slow path, say) follows its
        // caller's: it is not the kernel's.
        if let Some(i) = line.find("Function properties for ") {
            if line[i + "Function properties for ".len()..].trim() != current {
                current.clear();
            }
        }
        if HOT.iter().any(|h| current.starts_with(h)) && line.contains("Used ") {
            eprintln!("{current}: {}", line.trim());
        }
        if HOT.iter().any(|h| current.starts_with(h)) && line.contains("bytes spill stores") {
            eprintln!("{current}: {}", line.trim());
            assert!(
                line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                "{current} spills: {line}"
            );
            checked += 1;
        }
    }
    let expected = kernels::NAMES
        .iter()
        .filter(|n| HOT.iter().any(|h| n.starts_with(h)))
        .count();
    assert_eq!(checked, expected, "ptxas's report:\n{log}");
    kernels::compile((8, 0)).unwrap_or_else(|e| panic!("{e}"));
}
