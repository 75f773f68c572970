"""Runs tests/test_cuda_ops.py with the CUDA ops replaced by their CPU emulation.

Usage (from .ci/cuda_emulation.sh): run_tests.py [--all | --list | FILTER]
  (none)   the smoke subset (SMOKE below)
  --all    every case of test_key_pass_cuda, test_query_pass_cuda, test_query_pass_cuda_dy_in_float32,
           test_landmarks_cuda, test_landmarks_cuda_clamps_c_eff, the packed-layout tests
           (test_key_pass_cuda_packed, test_query_pass_cuda_packed, test_landmarks_cuda_packed),
           and the launch-limit cases below
  --list   print the case names and exit
  FILTER   the cases whose name contains FILTER, e.g. "key_pass", "float64", "(2, 2, 1, 16"

The tests' "cuda" device is mapped to CPU tensors with the same strides; the CUDA ops
(torch.ops.lara_kernels.* called on that device) go to the emulated kernels, the CPU ops
stay the real ones. poison_cache() is a no-op: the emulation fills shared memory with NaN
instead, and runs the emulated ops in test mode (lara_ops.h, new_output), so every output
and scratch buffer they allocate starts as NaN and an element no kernel writes shows up.
The tests that need a real device (determinism, large logits, device mixing, CUDA graphs)
are not run. Two cases of the emulation itself check the launch geometry against the
device's limits (emu_runtime.cpp, check_grid: x <= the reported cudaDevAttrMaxGridDimX,
y and z <= 65535):
  launch limits: B*H = 65536    every op on B = 4096, H = 16 (test_cuda_ops.MANY_HEADS) as a
                                dry run: each launch is checked and counted, no block runs
  launch limits: grid x <= 3    the emulated device reports a grid x limit of 3 blocks, so
                                the launchers split every grid into several launches; the
                                results must still equal the oracle (three test cases)
And "query backward in sample groups": a device with little shared memory makes the query
backward split C into groups (see query_pass_kernel.cu, bwd_group); "key pass in c blocks":
the same makes the key forward and dw kernels fall back to several c blocks (key_pass_kernel.cu,
plan_rows).
"""

import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

# key shapes 0 (small, contiguous), 1 (padded, strided), 5 (no values) and 8 (two groups of rows
# sharing each k/v tile); query shapes 0 and 1;
# float32 and float64; the query pass with and without MIS; one half-precision dy case.
SMOKE_KEY = {0, 1, 5, 8}
SMOKE_QUERY = {0, 1}
SMOKE_DTYPES = (torch.float32, torch.float64)


E = None  # the emulated ops module, once built


def launch_limits_many_heads(T):
    E.stats()
    E.set_dry_run(True)
    try:
        T.all_ops(T.all_ops_inputs(*T.MANY_HEADS, torch.float64, 12, "cuda"))
    finally:
        E.set_dry_run(False)
    _, _, launches, widest = E.stats()
    assert launches == 7, f"{launches} launches, expected 7 (one per kernel of the 6 ops; key_pass_bwd has two)"
    print(f"     {launches} launches checked, widest grid x = {widest}")


def launch_limits_grid_x(T):
    E.stats()
    E.set_max_grid_x(3)
    try:
        T.test_key_pass_cuda(T.KEY_SHAPES[1], torch.float64)
        T.test_query_pass_cuda(T.QUERY_SHAPES[1], torch.float64, True)
        T.test_landmarks_cuda(T.LANDMARK_SHAPES[1], torch.float32)
    finally:
        E.set_max_grid_x(2**31 - 1)
    blocks, _, launches, widest = E.stats()
    assert widest <= 3 and launches >= blocks / 3, (blocks, launches, widest)
    print(f"     {blocks} blocks in {launches} launches of at most {widest}")


def query_backward_in_groups(T, dtype):
    # 34000 bytes of shared memory per block: the query backward of QUERY_SHAPES[1] (C = 24)
    # cannot keep the partials of all 24 samples, so it runs 3 groups of 8, each block
    # recomputing the logits (its forward still fits)
    E.set_device(4, 34000)
    try:
        T.test_query_pass_cuda(T.QUERY_SHAPES[1], dtype, True)
    finally:
        E.set_device(4, 166912)
    print(f"     most shared memory of a launch: {E.stats()[1]} bytes")


def key_pass_in_c_blocks(T, dtype):
    # 26000 bytes of shared memory per block: the key pass of KEY_SHAPES[8] (C = 40) cannot hold
    # all 40 rows in one block, so it falls back to c blocks (k and v read once per c block;
    # float32: the forward keeps two groups of 32 rows, the dw kernel runs two c blocks of 32;
    # float64: the forward runs two c blocks, the dw kernel three of 16 rows)
    E.stats()
    E.set_device(4, 26000)
    try:
        T.test_key_pass_cuda(T.KEY_SHAPES[8], dtype)
    finally:
        E.set_device(4, 166912)
    most = E.stats()[1]
    assert most <= 26000, most
    print(f"     most shared memory of a launch: {most} bytes")


def cases(T):
    """(name, in_smoke, fn, args) for every emulated test case."""
    for i, shape in enumerate(T.KEY_SHAPES):
        for dt in T.DTYPES:
            yield f"test_key_pass_cuda {shape} {dt}", i in SMOKE_KEY and dt in SMOKE_DTYPES, T.test_key_pass_cuda, (shape, dt)
    for i, shape in enumerate(T.QUERY_SHAPES):
        for dt in T.DTYPES:
            for mis in (True, False):
                yield (f"test_query_pass_cuda {shape} {dt} {'mis' if mis else 'plain'}",
                       i in SMOKE_QUERY and dt in SMOKE_DTYPES, T.test_query_pass_cuda, (shape, dt, mis))
    for dt in (torch.float16, torch.bfloat16):
        yield (f"test_query_pass_cuda_dy_in_float32 {dt}", dt == torch.float16,
               T.test_query_pass_cuda_dy_in_float32, (dt,))
    for i, shape in enumerate(T.LANDMARK_SHAPES):
        for dt in T.DTYPES:
            yield f"test_landmarks_cuda {shape} {dt}", i == 1 and dt == torch.float32, T.test_landmarks_cuda, (shape, dt)
    yield "test_landmarks_cuda_clamps_c_eff", True, T.test_landmarks_cuda_clamps_c_eff, ()
    # the packed (varlen) layout: every case of the three tests; the smoke subset takes the key
    # pass with empty sequences (float32) and with 8 x 64 rows (float64), the query pass with
    # empty sequences and one without keys (float32, MIS), and the landmarks (float64)
    for i, case in enumerate(T.VARLEN_KEY):
        for dt in T.DTYPES:
            yield (f"test_key_pass_cuda_packed {case[0]} C={case[4]} {dt}",
                   (i, dt) in ((0, torch.float32), (3, torch.float64)), T.test_key_pass_cuda_packed, (case, dt))
    for i, case in enumerate(T.VARLEN_QUERY):
        for dt in T.DTYPES:
            for mis in (True, False):
                yield (f"test_query_pass_cuda_packed {case[0]} C={case[4]} {dt} {'mis' if mis else 'plain'}",
                       (i, dt, mis) == (0, torch.float32, True), T.test_query_pass_cuda_packed, (case, dt, mis))
    for i, case in enumerate(T.VARLEN_LANDMARKS):
        for dt in T.DTYPES:
            yield (f"test_landmarks_cuda_packed {case[0]} C={case[3]} {dt}", (i, dt) == (0, torch.float64),
                   T.test_landmarks_cuda_packed, (case, dt))
    yield "launch limits: B*H = 65536 (dry run)", True, launch_limits_many_heads, (T,)
    yield "launch limits: grid x <= 3", True, launch_limits_grid_x, (T,)
    for dt in (torch.float64, torch.float32):
        yield f"query backward in sample groups {dt}", True, query_backward_in_groups, (T, dt)
    for dt in (torch.float64, torch.float32):
        yield f"key pass in c blocks {dt}", True, key_pass_in_c_blocks, (T, dt)


def main():
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    import test_cuda_ops as T
    if arg == "--list":
        for name, smoke, _, _ in cases(T):
            print(("smoke  " if smoke else "       ") + name)
        return 0
    selected = [(n, f, a) for n, smoke, f, a in cases(T)
                if (arg == "--all") or (arg and arg in n) or (not arg and smoke)]
    if not selected:
        print(f"cuda_emulation: no case matches {arg!r} (see --list)")
        return 2

    from lara_kernels import _ops
    if not _ops.built():
        print(f"cuda_emulation: lara_kernels._C is not built ({_ops.C_ERROR}); the tests compare against "
              "the CPU ops: build it first (pip install --no-build-isolation -e .)")
        return 2

    from build import build
    global E
    t0 = time.time()
    E = build(REPO, REPO / os.environ.get("CUDA_EMU_BUILD_DIR", "build/cuda_emulation"))
    print(f"built the emulated ops in {time.time() - t0:.0f}s", flush=True)
    E.set_device(4, 166912)  # 4 SMs (more splits of the long axes per SM), 163 KiB opt-in shared memory
    E.set_poison_outputs(True)

    state = {"cuda": False}

    def to_dev(t, device):
        if t is None:
            return None
        state["cuda"] = device == "cuda"
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)

    class Ops:
        def __getattr__(self, name):
            real, emu = getattr(torch.ops.lara_kernels, name), getattr(E, name)
            return lambda *a: (emu if state["cuda"] else real)(*a)

    T.to_dev = to_dev
    T.poison_cache = lambda: None
    T.OPS = Ops()

    fails = 0
    t_all = time.time()
    for name, fn, args in selected:
        t = time.time()
        try:
            fn(*args)
            print(f"ok   {name}  {time.time() - t:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, fail at the end
            fails += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"{len(selected) - fails} passed, {fails} failed, {len(selected)} cases in {time.time() - t_all:.0f}s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
