"""No-leak check (run by hand, not in every CI run): many forward+backward iterations of
every backend that runs here, with process memory (RSS) read after a warm-up and at the
end. Usage: python .ci/leak_check.py [--iters 1000] [--bound-mib 16]

On a GPU the same loop reads torch.cuda.memory_allocated instead of RSS.
"""

import argparse
import gc
import os

import torch

from lara_kernels import dispatch, lara_attention, rfa_attention


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--bound-mib", type=float, default=16.0)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    probe = torch.zeros(1, 1, 4, 8, device=device)
    names = [n for n, b in dispatch.backends().items()
             if not b.not_supported_reasons("lara", probe, probe, probe, num_samples=8)]
    g = torch.Generator(device).manual_seed(0)
    failed = False
    for name in names:
        q, k, v = (torch.randn(2, 4, 257, 32, device=device, generator=g).requires_grad_() for _ in range(3))
        kpad = torch.rand(2, 257, device=device, generator=g) < 0.2

        def step():
            y = lara_attention(q, k, v, num_samples=16, training=True, generator=g, key_padding_mask=kpad,
                               backend=name)
            y = y + rfa_attention(q, k, v, num_samples=16, generator=g, backend=name)
            y.square().sum().backward()
            q.grad = k.grad = v.grad = None

        read = (lambda: torch.cuda.memory_allocated() / 2 ** 20) if cuda else rss_mib
        for _ in range(args.warmup):
            step()
        gc.collect()
        start = read()
        for _ in range(args.iters):
            step()
        gc.collect()
        end = read()
        growth = end - start
        ok = growth <= args.bound_mib
        failed |= not ok
        print(f"{name:10s} {args.iters} fwd+bwd after {args.warmup} warm-up: {start:.1f} -> {end:.1f} MiB "
              f"({'RSS' if not cuda else 'CUDA allocated'}), growth {growth:+.1f} MiB "
              f"{'ok' if ok else 'OVER'} (bound {args.bound_mib} MiB)")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
