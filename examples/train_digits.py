"""Train one small transformer three ways: softmax (SDPA), Performer (RFA) and LARA.

Data: scikit-learn's handwritten digits (1797 images of 8 x 8 pixels, shipped with
scikit-learn, no download), read as a sequence of 64 pixel tokens. Every run uses the
same seed, split, batch order, model size and number of steps; only the attention
differs. Writes to examples/results/:

    digits_results.json   settings, per-epoch test accuracy, final numbers
    digits_accuracy.md    the accuracy table
    digits_curve.png      test accuracy and training loss per epoch

    python examples/train_digits.py                 # a few minutes on a laptop CPU
    python examples/train_digits.py --epochs 2      # smoke run

Needs scikit-learn, matplotlib and tqdm (pip install scikit-learn matplotlib tqdm).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lara_kernels.nn import LaraEncoderLayer

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (attention, extra constructor arguments); num_samples is added below
VARIANTS = {
    "softmax": ("softmax", {}),
    "performer": ("performer", {}),
    "lara": ("lara", {}),
    "lara-learned": ("lara", {"landmarks": "learned"}),
    "lara-pool2d": ("lara", {"landmarks": "pool2d", "grid": (8, 8)}),
}


def load_digits_tensors(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0            # (1797, 64), pixels in [0, 1]
    y = torch.tensor(y, dtype=torch.long)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y.numpy())
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


class PixelTransformer(nn.Module):
    """64 pixel tokens -> value embedding + position embedding -> encoder -> mean pool -> 10 classes."""

    def __init__(self, attention, attn_kwargs, d_model=32, nhead=4, layers=2, ff=64, num_samples=16):
        super().__init__()
        self.value = nn.Linear(1, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(64, d_model))
        if attention != "softmax":
            attn_kwargs = dict(attn_kwargs, num_samples=num_samples)
        self.layers = nn.ModuleList(
            LaraEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True, norm_first=True, attention=attention,
                             **attn_kwargs)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, pixels):                                   # (B, 64)
        x = self.value(pixels[..., None]) + self.pos            # (B, 64, d_model)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


@torch.no_grad()
def accuracy(model, X, y, batch=512):
    model.eval()
    correct = sum((model(X[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    model.train()
    return correct / len(y)


def train_one(name, data, args):
    attention, attn_kwargs = VARIANTS[name]
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(args.seed)                                 # same init seed for every variant
    model = PixelTransformer(attention, attn_kwargs, d_model=args.d_model, nhead=args.heads,
                             layers=args.layers, ff=2 * args.d_model, num_samples=args.num_samples)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps_per_epoch = (len(ytr) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(args.seed)        # same batch order for every variant
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{name:>12}", leave=True)
    for epoch in bar:
        perm = torch.randperm(len(ytr), generator=order_gen)
        total, n = 0.0, 0
        for i in range(0, len(ytr), args.batch):
            idx = perm[i:i + args.batch]
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        acc = accuracy(model, Xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": total / n, "test_acc": acc})
        bar.set_postfix(loss=f"{total / n:.3f}", test_acc=f"{acc:.3f}")
    seconds = time.perf_counter() - t0
    return {
        "name": name, "attention": attention, "attn_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in attn_kwargs.items()},
        "num_samples": None if attention == "softmax" else args.num_samples,
        "params": sum(p.numel() for p in model.parameters()),
        "final_test_acc": history[-1]["test_acc"], "best_test_acc": max(h["test_acc"] for h in history),
        "train_seconds": seconds, "history": history,
    }


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # not a git checkout
        return "unknown"


def write_results(runs, args, data, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(), "commit": _commit(), "torch": torch.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "train_samples": len(data[1]), "test_samples": len(data[3]), "sequence_length": 64,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with open(os.path.join(out_dir, "digits_results.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)

    lines = [
        f"Digits (8x8, 64 pixel tokens): {meta['train_samples']} train / {meta['test_samples']} test images, "
        f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads (head dim {args.d_model // args.heads}), "
        f"{args.epochs} epochs of batch {args.batch}, seed {args.seed}; "
        f"LARA and Performer with {args.num_samples} samples per head. "
        f"CPU ({meta['cpu_threads']} threads), torch {meta['torch']}, commit {meta['commit']}, {meta['date']}.",
        "",
        "| attention | samples | params | final test acc | best test acc | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = "-" if r["num_samples"] is None else str(r["num_samples"])
        lines.append(f"| {r['name']} | {s} | {r['params']} | {r['final_test_acc']:.4f} | "
                     f"{r['best_test_acc']:.4f} | {r['train_seconds']:.1f} |")
    with open(os.path.join(out_dir, "digits_accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        ep = [h["epoch"] for h in r["history"]]
        ax1.plot(ep, [h["test_acc"] for h in r["history"]], marker=".", label=r["name"])
        ax2.plot(ep, [h["train_loss"] for h in r["history"]], marker=".", label=r["name"])
    ax1.set(xlabel="epoch", ylabel="test accuracy", title="digits: test accuracy")
    ax2.set(xlabel="epoch", ylabel="train loss (epoch mean)", title="digits: training loss", yscale="log")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(f"samples per head: {args.num_samples}; torch {meta['torch']}, CPU, commit {meta['commit']}, "
                 f"{meta['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "digits_curve.png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="softmax,performer,lara",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (these tensors are tiny: one thread is usually fastest)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}; choose from {', '.join(VARIANTS)}")
    data = load_digits_tensors(args.seed)
    runs = [train_one(n, data, args) for n in names]
    write_results(runs, args, data, args.out)


if __name__ == "__main__":
    main()
