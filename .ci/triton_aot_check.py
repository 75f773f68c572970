"""By hand: the whole ahead-of-time matrix of the Triton kernels (tests/test_triton_aot.py).

    python .ci/triton_aot_check.py [--arch 80 90] [--main] [--workers N] [--out FILE.md]

Compiles every kernel and variant (values or not, norm term or not, MIS or not, padding
or not, padded or packed (varlen) layout) as the launchers specialize them at B=8, H=12,
N=M=8192 (packed: T = B * 8192, max_seqlen 8192), for D in {64, 128, 256}, C in
{16, 64, 128, 256} and float32 / float16 / bfloat16, and the key pass alone with the
512 rows of grouped-query attention (G = 8 query heads x C = 64, D in {64, 128}), for
sm_80 and sm_90, with the installed Triton (also meant for Triton 3.6, the GPU machine's
version). Prints the table (registers, stack frame, spill stores, shared memory, mma;
each packed specialization next to the padded one) and every failed requirement
(compile error, shared memory over the limit, half dtype without mma, spills above the
bound at D, C <= 128 on sm_80 and sm_90, the known spills of SPILL_KNOWN above their own
bounds); exits 1 when there is one. ``--main``: the main configurations only (D in
{64, 128}, C in {16, 64, 128}, every dtype; both layouts, the variants holding the most
state); CI (tests/test_triton_aot.py) compiles two of them, D = C = 64 and 128, every
kernel in bfloat16, and in float32 the forward kernels and the key backward at C = D = 128.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def main(argv=None):
    import test_triton_aot as aot
    import triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--main", action="store_true", help="the main configurations only (as CI)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    configs = aot.MAIN if args.main else aot.FULL
    t0 = time.time()
    jobs = aot.jobs_for(configs, tuple(args.arch), full=not args.main, key_configs=() if args.main else aot.GQA_KEY)
    print(f"triton {triton.__version__}: {len(jobs)} distinct specializations", flush=True)
    results = aot.run_jobs(jobs, workers=args.workers)
    text = aot.table(results)
    bad = aot.problems(results)
    print(text)
    print(f"\n{len(results)} compiled in {time.time() - t0:.0f} s; {len(bad)} problems")
    for line in bad:
        print("FAIL", line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"triton {triton.__version__}\n\n{text}\n\n" + "".join(f"- FAIL {b}\n" for b in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
