#!/usr/bin/env python3
"""The machine code of one of hadal's CUDA kernels as NVRTC compiles it for Hopper, read on a
machine without a GPU: each instruction with the stall cycles the compiler scheduled after it,
and each loop (a backward branch) with its instructions, MMAs and scheduled stall cycles.

    pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    python3 tools/cuda-sass.py KERNEL [--list] [-D NAME=VALUE ...]

A static view (what the compiler scheduled, not what the GPU waits for: memory latencies and
other warps do not show), but a cheap one, to compare two versions of a kernel before spending
device time: `tools/device/run.sh profile` measures.
"""
import argparse
import ctypes
import glob
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ROOT / "src/backend/cuda/kernels"


def wheel_dir():
    import nvidia  # the wheels' namespace package

    return [pathlib.Path(p) / "cu13" for p in nvidia.__path__]


def source():
    # The translation unit in the order kernels.rs concatenates it.
    order = re.findall(r'\("([a-z_0-9]+\.cuh?)", include_str', (KERNELS.parent / "kernels.rs").read_text())
    return "".join(f"// ---- {f}\n{(KERNELS / f).read_text()}\n" for f in order)


def compile_cubin(defines):
    libs = [p for d in wheel_dir() for p in glob.glob(str(d / "lib/libnvrtc.so*")) if "builtins" not in p]
    if not libs:
        sys.exit("no NVRTC: pip install nvidia-cuda-nvrtc")
    lib_dir = os.path.dirname(libs[0])
    # libnvrtc loads its builtins from the same folder.
    os.environ["LD_LIBRARY_PATH"] = lib_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    ctypes.CDLL(os.path.join(lib_dir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    n = ctypes.CDLL(sorted(libs)[0])
    prog = ctypes.c_void_p()
    if n.nvrtcCreateProgram(ctypes.byref(prog), source().encode(), b"hadal.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"-lineinfo"] + [f"-D{d}".encode() for d in defines]
    rc = n.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    n.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    n.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(log.value.decode())
    n.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    n.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw


def tool(name):
    for d in wheel_dir():
        p = d / "bin" / name
        if p.exists():
            p.chmod(p.stat().st_mode | 0o111)
            return str(p)
    sys.exit(f"no {name}: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel")
    ap.add_argument("--list", action="store_true", help="every instruction, not only the loops")
    ap.add_argument("-D", dest="defines", action="append", default=[])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compile_cubin(a.defines))
        env = dict(os.environ, PATH=os.path.dirname(tool("nvdisasm")) + ":" + os.environ["PATH"])
        cuobjdump = tool("cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", "-fun", a.kernel, path], env=env,
                              capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", path], env=env, capture_output=True, text=True).stdout
    usage = re.search(rf"Function {re.escape(a.kernel)}:\n\s*(.*)", res)
    print(usage.group(1) if usage else f"{a.kernel}: not found")
    lines = sass.split("\n")
    insts = []
    for i, l in enumerate(lines):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);\s+/\* (0x[0-9a-f]+) \*/", l)
        if not m or i + 1 >= len(lines):
            continue
        hi = int(re.search(r"/\* (0x[0-9a-f]+) \*/", lines[i + 1]).group(1), 16)
        # Volta and later: the control bits in the upper word (stall cycles in bits 41-44).
        insts.append((int(m.group(1), 16), (hi >> 41) & 0xF, m.group(2).strip()))
    if a.list:
        for addr, stall, text in insts:
            print(f"{addr:6x} s{stall:2d}  {text}")
    print("loops (first, last address): instructions, MMAs, scheduled stall cycles")
    for addr, _, text in insts:
        b = re.search(r"BRA (0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            body = [x for x in insts if int(b.group(1), 16) <= x[0] <= addr]
            mma = sum("MMA" in x[2] for x in body)
            print(f"  {int(b.group(1), 16):6x}-{addr:6x}: {len(body):5d} {mma:4d} {sum(x[1] for x in body):6d}")


if __name__ == "__main__":
    main()
