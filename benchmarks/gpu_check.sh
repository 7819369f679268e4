#!/usr/bin/env bash
# The CUDA check of issue 13, for a machine with one NVIDIA GPU, in under 8 minutes, as it is:
#
#     benchmarks/gpu_check.sh            # from anywhere; prints everything and a summary at the end
#
# 1. the GPU and torch: nvidia-smi, torch.version.cuda, the device's name and capability, bf16 support
# 2. a Python with a CUDA build of torch (the Makefile pins torch==2.13.0, a CPU build, so `make setup` is of no
#    use for CUDA): .venv when its torch sees the GPU; otherwise benchmarks/out/venv-gpu, a venv made with
#    --system-site-packages over the system's python3 (whose torch must see the GPU), with etappe installed into it
#    by `pip install --no-deps --no-build-isolation -e .` (nothing downloaded; PYTHONPATH=src if even that fails),
#    and only the missing pure-Python dependencies installed, the way `make setup` would (which needs a package
#    index). With no CUDA torch anywhere it runs `make setup` (CPU torch), and the CUDA tests then skip: it says so.
# 3. the CUDA-marked tests: pytest -m cuda (tests/test_cuda.py: fp16 + GradScaler, bf16, pinned async save of CUDA
#    tensors, channels-last CNN; each resumes bit for bit under --deterministic)
# 4. a short throughput comparison: 32 vs bf16-mixed vs 16-mixed, the MLP (batch 256) and the CNN (batch 64),
#    the Trainer and a compute-only loop of the same precision, on Fashion-MNIST when installed (else random
#    images of its shape), 3 alternating rounds of a few seconds
#
# GPU_CHECK_PYTHON=/path/to/python skips step 2 and uses that Python (a CUDA torch and etappe importable).
# Every part runs under `timeout`, and no part may start past the 8-minute budget (BUDGET_S, default 470 s).
# The output is also written to benchmarks/out/gpu_check.log.

set -u
cd "$(dirname "$0")/.." || exit 1
mkdir -p benchmarks/out
LOG=benchmarks/out/gpu_check.log
exec > >(tee "$LOG") 2>&1

BUDGET_S=${BUDGET_S:-470}
START=$SECONDS
SUMMARY=()
PY=""

left() { echo $((BUDGET_S - (SECONDS - START))); }

# part NAME LIMIT_S COMMAND...: run COMMAND under timeout (the smaller of LIMIT_S and the budget left)
part() {
    local name=$1 limit=$2
    shift 2
    local budget
    budget=$(left)
    if ((budget < 10)); then
        SUMMARY+=("$name: not run (the ${BUDGET_S} s budget is spent)")
        return 124
    fi
    ((limit > budget)) && limit=$budget
    echo
    echo "=== $name (timeout ${limit} s) ==="
    local t0=$SECONDS rc
    timeout -k 10 "$limit" bash -c '"$@"' part "$@"  # bash -c: a function (exported below) runs as well
    rc=$?
    local note="ok"
    ((rc == 124 || rc == 137)) && note="TIMED OUT after ${limit} s"
    ((rc != 0 && rc != 124 && rc != 137)) && note="FAILED (exit $rc)"
    SUMMARY+=("$name: $note, $((SECONDS - t0)) s")
    return $rc
}

export -f left
cuda_torch() {  # does this python have a torch that sees a GPU?
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

# ------------------------------------------------------------------ 1. the GPU and torch
info() {
    date -u
    echo "repository: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files"
    nvidia-smi || echo "nvidia-smi: not found or failed"
    nproc
    for py in .venv/bin/python python3; do
        command -v "$py" >/dev/null 2>&1 || [[ -x $py ]] || continue
        echo "--- $py"
        "$py" - <<'EOF' 2>&1 | head -20
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
except Exception as exc:
    print("torch: not importable:", exc)
    raise SystemExit
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
    done
}
export -f cuda_torch info
part "GPU and torch" 30 info

# ------------------------------------------------------------------ 2. a Python with CUDA torch and etappe
setup() {
    if [[ -x .venv/bin/python ]] && cuda_torch .venv/bin/python; then
        echo "using .venv (its torch sees the GPU)"
        echo ".venv/bin/python" > benchmarks/out/gpu_check.python
        return 0
    fi
    local sys_py
    sys_py=$(command -v python3 || true)
    if [[ -n $sys_py ]] && cuda_torch "$sys_py"; then
        echo "the system's $sys_py has a CUDA torch: a venv over it with --system-site-packages, benchmarks/out/venv-gpu"
        [[ -x benchmarks/out/venv-gpu/bin/python ]] || "$sys_py" -m venv --system-site-packages benchmarks/out/venv-gpu || return 1
        local pip=(benchmarks/out/venv-gpu/bin/python -m pip --disable-pip-version-check --retries 0 --timeout 10)
        if ! "${pip[@]}" install -q --no-deps --no-build-isolation -e . ; then
            echo "pip install -e . failed: using PYTHONPATH=src instead"
            echo "PYTHONPATH=$PWD/src" > benchmarks/out/gpu_check.env
        fi
        # etappe's dependencies and the test extras' that the CUDA tests use; torch is the system's and stays
        local missing
        missing=$(benchmarks/out/venv-gpu/bin/python - <<'EOF'
import importlib.util
need = {"safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib", "numpy": "numpy",
        "sklearn": "scikit-learn", "xxhash": "xxhash", "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
        if [[ -n $missing ]]; then
            echo "missing: $missing; installing them (needs a package index, as make setup does)"
            "${pip[@]}" install -q $missing || echo "could not install $missing: tests that need them will fail"
        fi
        echo "benchmarks/out/venv-gpu/bin/python" > benchmarks/out/gpu_check.python
        return 0
    fi
    echo "no torch here sees a GPU: make setup (a CPU torch, as the Makefile pins it); the CUDA tests will skip."
    echo "For CUDA, install a CUDA torch into .venv first, e.g. .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    make setup && echo ".venv/bin/python" > benchmarks/out/gpu_check.python
}
rm -f benchmarks/out/gpu_check.python benchmarks/out/gpu_check.env
export -f setup
if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then  # a Python of your own, with a CUDA torch and etappe importable
    echo "$GPU_CHECK_PYTHON" > benchmarks/out/gpu_check.python
    SUMMARY+=("setup: skipped, GPU_CHECK_PYTHON=$GPU_CHECK_PYTHON")
else
    part "setup" 120 setup
fi
if [[ -s benchmarks/out/gpu_check.python ]]; then
    PY=$(cat benchmarks/out/gpu_check.python)
    [[ -s benchmarks/out/gpu_check.env ]] && export "$(cat benchmarks/out/gpu_check.env)"
    echo "python for the checks: $PY${PYTHONPATH:+ with PYTHONPATH=$PYTHONPATH}"
    "$PY" -c "import etappe, torch; print('etappe', etappe.__version__, 'from', etappe.__file__, '| torch', torch.__version__)"
fi

# ------------------------------------------------------------------ 3. the CUDA-marked tests
if [[ -n $PY ]]; then
    part "pytest -m cuda" 240 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider \
        --continue-on-collection-errors tests
else
    SUMMARY+=("pytest -m cuda: not run (no Python with etappe)")
fi

# ------------------------------------------------------------------ 4. throughput: 32 vs bf16-mixed vs 16-mixed
throughput() {
    "$PY" - <<'EOF'
import statistics
import time

import torch
from torch import nn

from etappe import models
from etappe.data import TensorData, load_dataset
from etappe.loop import Trainer

if not torch.cuda.is_available():
    raise SystemExit("torch.cuda.is_available() is False: no throughput to measure")
dev = torch.device("cuda")
try:
    ds = load_dataset("fashion-mnist", allow_download=False)
    x, y, scale, where = ds.train.x, ds.train.y, ds.train.input_scale, "Fashion-MNIST"
except Exception as exc:  # noqa: BLE001 -- not installed here: random images of its shape time the same
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60_000, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (60_000,), generator=g)
    scale, where = 1 / 255, f"random images of Fashion-MNIST's shape ({type(exc).__name__})"
N = 30_000  # samples per run: a few seconds at most per run on any recent GPU
x, y = x[:N].contiguous(), y[:N].contiguous()
xf, yd = x.float().mul_(scale).to(dev), y.to(dev)
data = TensorData(x, y, scale)
WORK = {"mlp b256": ("mlp", 256), "cnn b64": ("cnn", 64)}
PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def make(model_name):
    torch.manual_seed(0)
    m = models.build(model_name, (1, 28, 28), 10)
    if model_name == "cnn":
        m = m.to(memory_format=torch.channels_last)  # as `etappe train` runs etappe's conv models
    return m


def bound(model_name, bs, precision):
    """The compute-only loop: data on the GPU, batches by indexing, autocast, GradScaler for fp16, no .item()."""
    m = make(model_name).to(dev)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    loss_fn = nn.CrossEntropyLoss()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    perm = torch.randperm(N, device=dev)
    for i in range(0, N, bs):
        idx = perm[i : i + bs]
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(m(xf[idx]), yd[idx])
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    torch.cuda.synchronize()
    return N / (time.perf_counter() - t0)


def trainer(model_name, bs, precision):
    m = make(model_name)
    t = Trainer(m, torch.optim.Adam(m.parameters(), lr=1e-3), nn.CrossEntropyLoss(), train_data=data,
                batch_size=bs, precision=precision, device="cuda", progress=False, quiet=True)
    t0 = time.perf_counter()
    t.fit(1)
    torch.cuda.synchronize()
    return N / (time.perf_counter() - t0)


print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; {N} samples of {where} per run, Adam lr 1e-3,"
      " median of 3 alternating rounds; ratios of each round's runs (each Trainer run right after its bound)")
for name, (model_name, bs) in WORK.items():
    for p in PRECISIONS:  # warm-up: cuDNN/cuBLAS handles, kernels, the first CUDA context work
        bound(model_name, bs, p)
        trainer(model_name, bs, p)
    runs = {p: {"bound": [], "trainer": []} for p in PRECISIONS}
    for r in range(3):
        for p in PRECISIONS[r % 3:] + PRECISIONS[: r % 3]:
            runs[p]["bound"].append(bound(model_name, bs, p))
            runs[p]["trainer"].append(trainer(model_name, bs, p))
    med = statistics.median
    print(f"\n{name}")
    print("| precision | bound samples/s | Trainer samples/s | bound / fp32 bound | Trainer / own bound |")
    print("|---|---|---|---|---|")
    for p in PRECISIONS:
        b, t = runs[p]["bound"], runs[p]["trainer"]
        vs32 = med(x / z for x, z in zip(b, runs["32"]["bound"]))
        own = med(x / z for x, z in zip(t, b))
        print(f"| {p} | {med(b):,.0f} | {med(t):,.0f} | {vs32:.2f} | {own:.3f} |")
EOF
}
export -f throughput
export PY
if [[ -n $PY ]]; then
    part "throughput: 32 vs bf16-mixed vs 16-mixed" 120 throughput
else
    SUMMARY+=("throughput: not run (no Python with etappe)")
fi

echo
echo "=== summary ($((SECONDS - START)) s in all, budget ${BUDGET_S} s) ==="
for line in "${SUMMARY[@]}"; do echo "- $line"; done
echo "(log: $LOG)"
