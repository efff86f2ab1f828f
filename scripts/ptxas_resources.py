#!/usr/bin/env python3
"""Registers and static shared memory of every CUDA kernel the tuner registers, as ptxas reports them.

Compiles the kernel files with `nvcc -Xptxas -v` for each architecture and writes one line per kernel
instantiation: `ARCH KERNEL REGISTERS STATIC_SMEM_BYTES`, kernel names as src/tune/registry.cpp writes them
(namespaces and parameter lists dropped, KvDtype values by name). tests/tune checks the registry against
tests/tune/ptxas_resources.txt: no registry entry may claim fewer registers or different static shared memory
than the kernels it names. When a kernel changes, regenerate the file (needs nvcc; a few minutes):
    scripts/ptxas_resources.py > tests/tune/ptxas_resources.txt
and `--check` exits 1 when the committed file is out of date.
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--root" in sys.argv:  # another checkout's sources (e.g. a clean export of HEAD)
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--root") + 1])
SOURCES = ["src/ops/linear/linear_cuda.cu", "src/ops/linear/gemm_cuda.cu", "src/ops/attention/attention_cuda.cu",
           "src/ops/linear/gemv_fp4mma_cuda.cu"]
ARCHS = ["90a", "120a"]
KV = {"0": "F32", "1": "Bf16", "2": "Fp8", "3": "Nvfp4"}
NVCC = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")


def normalize(demangled):
    name = re.sub(r"^void ", "", demangled)
    name = re.sub(r"nibble::cuda::\(anonymous namespace\)::", "", name)
    # drop the parameter list: the last top-level (...) group
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):
        c = name[i]
        if c == ")":
            depth += 1
        elif c == "(":
            depth -= 1
            if depth == 0:
                cut = i
                break
    name = name[:cut]
    name = re.sub(r"\(nibble::KvDtype\)(\d)", lambda m: KV[m.group(1)], name)
    return name.replace(" ", "")


def parse(log, arch):
    out = []
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            smem = re.search(r"(\d+) bytes smem", line)
            out.append((current, int(m.group(1)), int(smem.group(1)) if smem else 0))
            current = None
    names = subprocess.run(["c++filt"], input="\n".join(n for n, _, _ in out), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [f"sm_{arch} {normalize(d)} {r} {s}" for d, (_, r, s) in zip(names, out)]


def generate():
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            for src in SOURCES:
                cmd = [NVCC, "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-I", os.path.join(ROOT, "src"),
                       "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c",
                       os.path.join(ROOT, src), "-o", os.path.join(tmp, "k.o")]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"nvcc failed on {src} for sm_{arch}:\n{r.stderr}")
                lines += parse(r.stderr + r.stdout, arch)
    return "".join(sorted(set(l + "\n" for l in lines)))


def main():
    text = generate()
    if "--check" in sys.argv[1:]:
        path = os.path.join(ROOT, "tests", "tune", "ptxas_resources.txt")
        with open(path) as f:
            if f.read() != text:
                sys.exit(f"{path} is out of date: regenerate it with scripts/ptxas_resources.py > {path}")
        print("tests/tune/ptxas_resources.txt matches the kernels")
        return
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
