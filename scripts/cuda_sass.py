"""What the CUDA kernels compile to, without a GPU: kernels.cu (or FILE) through NVRTC to an
sm_90 cubin with ptxas -v (each kernel's registers, spills, shared memory), and, with
`--sass KERNEL...`, those kernels' SASS and a count of their loads, stores, branches, barriers
and shuffles (a load waited for inside a branch with its use shows as loads between branches).

  target/nvrtc/venv/bin/pip install -q nvidia-cuda-nvdisasm   # once (scripts/cuda_check.sh makes the venv)
  target/nvrtc/venv/bin/python scripts/cuda_sass.py [--file FILE] [--arch sm_90] [--sass attn_vec128 add_rmsnorm]
"""
import argparse, collections, ctypes, glob, os, re, subprocess, sys, sysconfig

ap = argparse.ArgumentParser()
ap.add_argument("--file", default=os.path.join(os.path.dirname(__file__), "../src/backend/cuda/kernels.cu"))
ap.add_argument("--arch", default="sm_90")
ap.add_argument("--sass", nargs="*", default=[])
a = ap.parse_args()
site = sysconfig.get_paths()["purelib"]
libs = glob.glob(os.path.join(site, "nvidia/cu13/lib/libnvrtc.so.13"))
if not libs:
    sys.exit("libnvrtc.so.13 not found in this Python's site-packages: run scripts/cuda_check.sh, then use target/nvrtc/venv/bin/python")
nv = ctypes.CDLL(libs[0])
prog = ctypes.c_void_p()
if nv.nvrtcCreateProgram(ctypes.byref(prog), open(a.file).read().encode(), b"kernels.cu", 0, None, None) != 0:
    sys.exit("nvrtcCreateProgram failed")
opts = [f"--gpu-architecture={a.arch}".encode(), b"--ptxas-options=-v"]
rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
nv.nvrtcGetProgramLog(prog, log)
log = log.value.decode(errors="replace")
if rc != 0:
    sys.exit(log)
# per kernel: registers, spills, shared memory
cur, spill = None, 0
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\w+)'", line)
    if m:
        cur, spill = m.group(1), 0
    m = re.search(r"(\d+) bytes spill stores", line)
    if m and cur:
        spill = int(m.group(1))
    m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line)
    if m and cur:
        print(f"{cur:32s} {m.group(1):>4s} registers  spills {spill:>4d} B  smem {m.group(2) or 0} B")
        cur = None
if not a.sass:
    sys.exit(0)
nv.nvrtcGetCUBINSize(prog, ctypes.byref(n))
cubin = ctypes.create_string_buffer(n.value)
nv.nvrtcGetCUBIN(prog, cubin)
path = "/tmp/flashmoe-kernels.cubin"
open(path, "wb").write(cubin.raw)
dis = glob.glob(os.path.join(site, "nvidia/cu13/bin/nvdisasm"))
if not dis:
    sys.exit("nvdisasm not found: pip install nvidia-cuda-nvdisasm into this Python")
os.chmod(dis[0], 0o755)
sass = subprocess.run([dis[0], "-c", path], capture_output=True, text=True, check=True).stdout.splitlines()
funcs, cur = {}, None
for line in sass:
    m = re.match(r"^\.text\.(\w+):", line)
    if m:
        cur = m.group(1)
        funcs[cur] = []
    elif cur:
        funcs[cur].append(line)
for k in a.sass:
    ins = [l for l in funcs.get(k, []) if re.search(r"/\*[0-9a-f]{4}\*/", l)]
    if not ins:
        print(f"{k}: no such kernel")
        continue
    ops = collections.Counter()
    for l in ins:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", l)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    keep = ("LDG", "LD", "LDS", "STG", "ST", "STS", "BRA", "BAR", "SHFL", "ATOMG", "MEMBAR")
    print(f"{k}: {len(ins)} instructions; " + ", ".join(f"{o} {ops[o]}" for o in keep if ops[o]))
    open(f"/tmp/{k}.sass", "w").write("\n".join(funcs[k]))
    print(f"  SASS in /tmp/{k}.sass")
