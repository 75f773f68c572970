"""The main job on any machine: ``python -m lara_kernels.demo`` (also ``lara-demo``).

For a few sequence lengths it prints, on the same inputs, LARA's and Performer's (RFA)
relative error against exact softmax attention and their forward times next to
``scaled_dot_product_attention``'s, using the backend ``auto`` picks for the device (the definition of LARA every backend
computes: docs/math.md).
Inputs: queries and keys drawn around a few shared directions (so that attention is
peaked, as in trained models, rather than the near-uniform attention of white noise).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from . import dispatch, lara_attention, rfa_attention


def clustered_inputs(B, H, N, D, clusters=8, norm=2.0, spread=0.125, generator=None, dtype=torch.float32,
                     device="cpu"):
    """q, k near `clusters` random directions (contiguous runs along the sequence) of length ``norm * D ** 0.25`` (so that logits
    within a cluster are about ``norm ** 2``), plus noise of std ``spread``; v standard normal."""
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    centers = F.normalize(draw(B, H, clusters, D), dim=-1) * norm * D ** 0.25
    # locality, as in text and images: the cluster changes along the sequence in runs
    idx_q = torch.randint(clusters, (B, H, N), generator=generator).sort(-1).values.to(device)
    idx_k = torch.randint(clusters, (B, H, N), generator=generator).sort(-1).values.to(device)
    pick = lambda idx: torch.gather(centers, 2, idx[..., None].expand(B, H, N, D))  # noqa: E731
    q = pick(idx_q) + spread * draw(B, H, N, D)
    k = pick(idx_k) + spread * draw(B, H, N, D)
    return q, k, draw(B, H, N, D)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def median_ms(fn, threads):
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return t.blocked_autorange(min_run_time=0.3).median * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    print(f"LARA demo on {device} ({threads} threads): B={args.batch}, H={args.heads}, D={args.head_dim}, "
          f"C={args.samples} samples, float32, auto backend on {device.type}: {dispatch.auto_order(device.type)}")
    print(f"{'N':>6} | {'err LARA':>9} {'err RFA':>9} | {'SDPA ms':>8} {'LARA ms':>8} {'RFA ms':>8} | LARA speed-up")
    for N in args.lengths:
        q, k, v = clustered_inputs(args.batch, args.heads, N, args.head_dim, generator=g, device=device)
        exact = F.scaled_dot_product_attention(q, k, v)
        y_lara = lara_attention(q, k, v, num_samples=args.samples)
        y_rfa = rfa_attention(q, k, v, num_samples=args.samples, generator=torch.Generator(device).manual_seed(1))
        with torch.no_grad():
            t_sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), threads)
            t_lara = median_ms(lambda: lara_attention(q, k, v, num_samples=args.samples), threads)
            t_rfa = median_ms(lambda: rfa_attention(q, k, v, num_samples=args.samples), threads)
        print(f"{N:>6} | {rel_err(y_lara, exact):>9.4f} {rel_err(y_rfa, exact):>9.4f} | "
              f"{t_sdpa:>8.2f} {t_lara:>8.2f} {t_rfa:>8.2f} | {t_sdpa / t_lara:>5.2f}x")
    print("err: relative Frobenius error against exact softmax attention on the same inputs; "
          "times: median forward, torch.utils.benchmark.")


if __name__ == "__main__":
    main()
