//! hadal's CUDA C++ kernels (in `kernels/`), compiled by NVRTC for the device found, to machine
//! code (a cubin: no PTX left for the driver to translate), and cached on disk by a hash of the
//! source, the options and the compiler's version.

use std::ffi::CString;
use std::path::PathBuf;

use super::gpu;
use crate::error::{Error, Result};

/// The source: one translation unit, the shared definitions first.
pub const SOURCE: &[(&str, &str)] = &[
    ("prelude.cuh", include_str!("kernels/prelude.cuh")),
    ("rows.cuh", include_str!("kernels/rows.cuh")),
    ("linear.cu", include_str!("kernels/linear.cu")),
    ("ops.cu", include_str!("kernels/ops.cu")),
    ("mhc.cu", include_str!("kernels/mhc.cu")),
    ("compress.cu", include_str!("kernels/compress.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("moe.cu", include_str!("kernels/moe.cu")),
    ("mma.cu", include_str!("kernels/mma.cu")),
    ("tiles.cu", include_str!("kernels/tiles.cu")),
    ("attention_mma.cu", include_str!("kernels/attention_mma.cu")),
    ("indexer.cu", include_str!("kernels/indexer.cu")),
    ("sample.cu", include_str!("kernels/sample.cu")),
    ("state.cu", include_str!("kernels/state.cu")),
];

/// Every kernel the backend launches.
pub const NAMES: &[&str] = &[
    "fake_quant_fp8",
    "gemv_f8",
    "gemv_f4",
    "gemv_bf16",
    "gemv_f32",
    "gemv_rows_bf16",
    "gemv_rows_f32",
    "rms_norm",
    "head_norm_rope",
    "rope",
    "index_queries",
    "scale_k",
    "add_k",
    "add_to_copies",
    "swiglu",
    "embed",
    "hc_mix",
    "hc_pre_m4",
    "hc_pre_rows_m4",
    "hc_post",
    "hc_head",
    "compress_emit",
    "compress_carry",
    "kv_pack",
    "window_store",
    "attend",
    "attend_mma",
    "attend_join",
    "index_stage",
    "index_scores",
    "index_topk",
    "topk_digit",
    "topk_count",
    "topk_write",
    "topk_cluster",
    "route",
    "experts_up_f4",
    "experts_down_f4",
    "experts_up_f8",
    "experts_down_f8",
    "experts_up_bf16",
    "experts_down_bf16",
    "experts_up_f32",
    "experts_down_f32",
    "moe_combine",
    "quant_act",
    "swiglu_quant",
    "mma_linear_f8_r1",
    "mma_linear_f8_r2",
    "mma_linear_f8_r4",
    "mma_linear_f8_r8",
    "mma_linear_f8x_r1",
    "mma_linear_f8x_r2",
    "split_act",
    "mma_linear_f4_r1",
    "mma_linear_f4_r2",
    "mma_linear_f4_r4",
    "mma_experts_up_f8_r1",
    "mma_experts_down_f8_r1",
    "mma_experts_up_f4_r1",
    "mma_experts_down_f4_r1",
    "mma_experts_up_f4_x1",
    "mma_experts_down_f4_x1",
    "tile_linear_f8",
    "tile_linear_f8x",
    "tile_linear_f4",
    "tile_experts_up_f8",
    "tile_experts_down_f8",
    "tile_experts_up_f4",
    "tile_experts_down_f4",
    "sample_rows",
    "copy_blocks",
    "fill_random",
];

/// The whole source as NVRTC sees it.
pub fn source() -> String {
    SOURCE
        .iter()
        .map(|(name, text)| format!("// ---- {name}\n{text}\n"))
        .collect()
}

/// Compiler options for compute capability `arch`.
/// `HADAL_CUDA_FMAD=0` keeps `a * b + c` as two roundings, as the CPU computes it (for
/// comparing the two platforms' arithmetic; explicit `fmaf` calls stay fused).
fn options(arch: (i32, i32)) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ];
    if std::env::var("HADAL_CUDA_FMAD").is_ok_and(|v| v == "0") {
        o.push("--fmad=false".into());
    }
    // `HADAL_CUDA_DEFINES="CP_PF=256 LD_PF=128"`: the kernels' tuning macros (prelude.cuh), for
    // measuring one build's variants side by side.
    if let Ok(defs) = std::env::var("HADAL_CUDA_DEFINES") {
        o.extend(defs.split_whitespace().map(|d| format!("-D{d}")));
    }
    o
}

/// FNV-1a, stable across builds (the cache key).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HADAL_CACHE_DIR") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("hadal"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hadal"))
}

/// NVRTC's version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    gpu::nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Device(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Compiles the kernels to a cubin for `arch` (no GPU needed).
pub fn compile(arch: (i32, i32)) -> Result<Vec<u8>> {
    compile_with(arch, &[]).map(|(cubin, _)| cubin)
}

/// ptxas's report of each kernel's registers, shared memory and spills for `arch`.
pub fn resources(arch: (i32, i32)) -> Result<String> {
    compile_with(arch, &["--ptxas-options=-v".into()]).map(|(_, log)| log)
}

fn compile_with(arch: (i32, i32), extra: &[String]) -> Result<(Vec<u8>, String)> {
    gpu::nvrtc()?;
    let src = CString::new(source()).expect("kernel source has no NUL");
    let name = CString::new("hadal.cu").expect("no NUL");
    let mut opts = options(arch);
    opts.extend_from_slice(extra);
    let prog = cudarc::nvrtc::result::create_program(&src, Some(name.as_c_str()))
        .map_err(|e| Error::Device(format!("NVRTC: {e:?}")))?;
    // SAFETY: `prog` is a live program; it is destroyed below whatever happens.
    let out = unsafe {
        let compiled = cudarc::nvrtc::result::compile_program(prog, &opts);
        let log = cudarc::nvrtc::result::get_program_log(prog)
            .map(|l| {
                // `c_char` is i8 on x86_64 and u8 on aarch64.
                #[allow(clippy::unnecessary_cast)]
                let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                String::from_utf8_lossy(&bytes)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(Error::Device(format!(
                "compiling the CUDA kernels for sm_{}{} ({e:?}):\n{log}",
                arch.0, arch.1
            ))),
            Ok(()) => {
                let mut n = 0usize;
                cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut n)
                    .result()
                    .map_err(|e| Error::Device(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut cubin = vec![0u8; n];
                cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _)
                    .result()
                    .map_err(|e| Error::Device(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok((cubin, log))
            }
        }
    };
    // SAFETY: the program is not used afterwards.
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    out
}

/// The cubin for `arch`, from the disk cache or compiled (and cached) now.
pub fn cubin(arch: (i32, i32)) -> Result<Vec<u8>> {
    let version = nvrtc_version()?;
    let key = fnv(&[
        source().as_bytes(),
        options(arch).join(" ").as_bytes(),
        format!("{version:?}").as_bytes(),
    ]);
    let path =
        cache_dir().map(|d| d.join(format!("kernels-sm{}{}-{key:016x}.cubin", arch.0, arch.1)));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bytes);
    }
    let bytes = compile(arch)?;
    if let Some(p) = path {
        // A cache that cannot be written only costs the next start a compilation.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(bytes)
}
