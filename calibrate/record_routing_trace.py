"""Record a real MoE routing trace: train a small byte-level MoE language model, log its routing.

moesim's placement planner needs routing with the structure real models show: skewed expert
load, experts that fire together, and load that drifts as the text changes. This script makes
such a trace from text every Python install has, the standard library's ``*.py`` sources:

1. corpus  -- the stdlib files in sorted path order (tests and site-packages left out). Each
              recording domain (``DOMAINS``: email/http, asyncio, json/xml, ...) holds out every
              ``HOLDOUT_EVERY``-th of its files; everything else is the training text.
2. train   -- a decoder-only transformer over bytes (vocab 256) whose feed-forward blocks are
              MoE layers: softmax router, top-k experts (renormalised gates), SwiGLU experts,
              plus the Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` with a small
              coefficient, so balance is encouraged but realistic skew remains. Batches are
              random windows of the training text (a shuffled mix of all modules).
3. record  -- the held-out text of each domain in turn (windows spread evenly over the
              domain's files), routed by the trained model; each token's top-k expert ids per
              layer, sorted by gate, and the token's domain index are kept in that order.

Output (``np.savez_compressed``): ``expert_ids`` int16[layers, tokens, k], ``num_experts``,
``domain`` int16[tokens], ``domains`` str[D], and metadata (dims, steps, losses, seed, torch
version, date). Seeded and deterministic for a fixed machine, thread count and Python version.
Only torch and numpy are imported (no moesim). Run ``python record_routing_trace.py --help``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TraceRecordError", "TraceConfig", "DOMAINS", "HOLDOUT_EVERY", "Corpus",
           "collect_corpus", "MoELM", "train", "record", "summarize", "record_trace",
           "save_trace", "main"]

# (domain name, top-level stdlib packages/modules it covers), recorded in this order.
DOMAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("email+http", ("email", "http", "urllib")),
    ("asyncio", ("asyncio", "concurrent")),
    ("json+xml", ("json", "xml")),
    ("unittest", ("unittest",)),
    ("tkinter+idlelib", ("tkinter", "idlelib")),
    ("docs", ("pydoc_data",)),  # English prose: the interactive help() topics
    ("tables", ("encodings",)),  # codec mapping tables (near-copies of each other)
)
HOLDOUT_EVERY = 3  # file i of a domain (sorted) is held out when i % HOLDOUT_EVERY == 1
_SKIP_PARTS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


class TraceRecordError(ValueError):
    """A recorder setting or input is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class TraceConfig:
    """Model, training and recording sizes (defaults: the shipped trace)."""

    layers: int = 4  # MoE layers (every block's FFN is an MoE)
    hidden: int = 128  # model width
    heads: int = 4  # attention heads; hidden must divide by it
    num_experts: int = 32  # experts per MoE layer
    top_k: int = 4  # experts per token; >1 so co-activation can emerge
    expert_ffn: int = 128  # SwiGLU inner width of each expert (small: fine-grained experts)
    seq_len: int = 128  # context window in bytes
    batch: int = 16  # windows per training step
    steps: int = 600  # optimiser steps
    lr: float = 3e-3  # AdamW peak learning rate (linear warmup, cosine decay to 10%)
    aux_coef: float = 0.01  # load-balancing loss weight (Switch Transformer used 0.01)
    tokens_per_domain: int = 8192  # recorded tokens per domain (a multiple of seq_len)
    seed: int = 0
    threads: int = 2  # torch.set_num_threads

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("aux_coef", "seed") and value < 0:
                raise TraceRecordError(f"{f.name}={value} must be >= 0")
            if f.name not in ("aux_coef", "seed") and not value > 0:
                raise TraceRecordError(f"{f.name}={value} must be > 0")
        if self.hidden % self.heads:
            raise TraceRecordError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.top_k > self.num_experts:
            raise TraceRecordError(
                f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        if self.tokens_per_domain % self.seq_len:
            raise TraceRecordError(f"tokens_per_domain={self.tokens_per_domain} must be a "
                                   f"multiple of seq_len={self.seq_len}")


@dataclass(frozen=True)
class Corpus:
    """Training bytes and each domain's held-out bytes (uint8 arrays)."""

    train: np.ndarray  # [train_bytes]
    heldout: tuple[np.ndarray, ...]  # one [bytes] array per domain, in DOMAINS order
    train_files: int
    heldout_files: tuple[int, ...]


def _domain_of(rel: Path, domains: tuple[tuple[str, tuple[str, ...]], ...]) -> int | None:
    top = rel.parts[0].removesuffix(".py")
    return next((i for i, (_, mods) in enumerate(domains) if top in mods), None)


def _sources(root: Path) -> list[Path]:
    """Relative paths of the *.py files under root, not descending into ``_SKIP_PARTS``."""
    found = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_PARTS]
        rel = Path(top).relative_to(root)
        found += [rel / n for n in names if n.endswith(".py")]
    return found


def collect_corpus(stdlib: Path | None = None,
                   domains: tuple[tuple[str, tuple[str, ...]], ...] = DOMAINS) -> Corpus:
    """Split the stdlib sources into training text and per-domain held-out text (see step 1)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(_sources(root))
    train: list[bytes] = []
    held: list[list[bytes]] = [[] for _ in domains]
    seen = [0] * len(domains)
    for rel in files:
        text = (root / rel).read_bytes() + b"\n"
        d = _domain_of(rel, domains)
        if d is not None and seen[d] % HOLDOUT_EVERY == 1:
            held[d].append(text)
        else:
            train.append(text)
        if d is not None:
            seen[d] += 1
    empty = [domains[d][0] for d in range(len(domains)) if not held[d]]
    if not train or empty:
        raise TraceRecordError(f"stdlib at {root} gave no training text or no held-out files "
                               f"for domains {empty}; allowed: a directory of *.py sources")
    arr = [np.frombuffer(b"".join(h), dtype=np.uint8) for h in held]
    return Corpus(np.frombuffer(b"".join(train), dtype=np.uint8), tuple(arr),
                  len(train), tuple(len(h) for h in held))


class MoE(nn.Module):
    """Top-k softmax router over SwiGLU experts; ``forward`` also returns the balance loss."""

    def __init__(self, cfg: TraceConfig) -> None:
        super().__init__()
        e, d, f = cfg.num_experts, cfg.hidden, cfg.expert_ffn
        self.k = cfg.top_k
        self.router = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.w_up = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.w_down = nn.Parameter(torch.randn(e, f, d) * 0.02 / math.sqrt(2 * cfg.layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, d] -> (y [T, d], expert ids [T, k] sorted by gate, balance loss [])."""
        probs = self.router(x).float().softmax(-1)  # [T, E]
        gates, ids = probs.topk(self.k, dim=-1)  # [T, k], distinct ids per token
        gates = gates / gates.sum(-1, keepdim=True)
        num_e = probs.shape[1]
        flat = ids.reshape(-1)  # [T*k]
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_e)
        rows = x.repeat_interleave(self.k, dim=0)[order]  # [T*k, d] grouped by expert
        outs = []  # unbind once: indexing w[e] per expert would backprop E full-size grads
        for r, wg, wu, wd in zip(rows.split(counts.tolist()), self.w_gate.unbind(0),
                                 self.w_up.unbind(0), self.w_down.unbind(0)):
            if r.shape[0]:
                outs.append((F.silu(r @ wg) * (r @ wu)) @ wd)
        out = torch.cat(outs)  # [T*k, d] in expert order
        y = torch.empty_like(out).index_copy_(0, order, out)  # back to [T*k] token order
        y = (y.view(-1, self.k, x.shape[1]) * gates.unsqueeze(-1).to(y.dtype)).sum(1)
        frac = counts.float() / flat.numel()  # f_e: share of assignments (no gradient)
        balance = num_e * (frac * probs.mean(0)).sum()
        return y, ids, balance


class Block(nn.Module):
    """Pre-norm causal self-attention then an MoE feed-forward."""

    def __init__(self, cfg: TraceConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.moe = MoE(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).unbind(2)  # (B,T,nh,hs)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B,nh,T,hs)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        y, ids, balance = self.moe(self.ln2(x).reshape(b * t, d))
        return x + y.view(b, t, d), ids, balance


class MoELM(nn.Module):
    """Byte-level decoder-only MoE transformer (tied input/output embedding)."""

    def __init__(self, cfg: TraceConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, cfg.hidden)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.hidden)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """idx: [B, T] bytes -> (logits [B, T, 256], ids [layers, B*T, k], mean balance loss)."""
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        all_ids, balance = [], idx.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, ids, bal = block(x)
            all_ids.append(ids)
            balance = balance + bal
        logits = self.ln(x) @ self.tok.weight.T
        return logits, torch.stack(all_ids), balance / len(self.blocks)


def _lr(step: int, cfg: TraceConfig) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def train(model: MoELM, text: np.ndarray, cfg: TraceConfig) -> np.ndarray:
    """Train on random windows of ``text`` [bytes]; return the LM loss of each step [steps].

    Entry s is the cross-entropy of step s's batch before that step's update, so entry 0 is
    the untrained model's loss.
    """
    if text.size <= cfg.seq_len + 1:
        raise TraceRecordError(f"training text has {text.size} bytes; need > {cfg.seq_len + 1}")
    data = torch.from_numpy(text.astype(np.int64))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01,
                            betas=(0.9, 0.95))
    offsets = torch.arange(cfg.seq_len + 1)
    losses = np.empty(cfg.steps)
    model.train()
    for step in range(cfg.steps):
        start = torch.randint(0, text.size - cfg.seq_len - 1, (cfg.batch, 1), generator=gen)
        win = data[start + offsets]  # [B, T+1]
        logits, _, balance = model(win[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, 256), win[:, 1:].reshape(-1))
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        (lm + cfg.aux_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses[step] = lm.item()
    return losses


@torch.no_grad()
def record(model: MoELM, heldout: tuple[np.ndarray, ...],
           cfg: TraceConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Route each domain's held-out text in order (step 3).

    Returns ``expert_ids`` int16[layers, tokens, k], ``domain`` int16[tokens] and the mean
    next-byte loss per domain float[D]. Each domain contributes ``tokens_per_domain`` tokens:
    ``tokens_per_domain / seq_len`` windows spaced evenly over its text.
    """
    model.eval()
    n_win = cfg.tokens_per_domain // cfg.seq_len
    ids, dom, loss = [], [], []
    for d, text in enumerate(heldout):
        if text.size <= cfg.seq_len + 1:
            raise TraceRecordError(f"domain {d} has {text.size} held-out bytes; "
                                   f"need > {cfg.seq_len + 1}")
        starts = np.linspace(0, text.size - cfg.seq_len - 1, n_win).astype(np.int64)
        win = torch.from_numpy(text[starts[:, None] + np.arange(cfg.seq_len + 1)].astype(np.int64))
        logits, layer_ids, _ = model(win[:, :-1])
        loss.append(F.cross_entropy(logits.reshape(-1, 256), win[:, 1:].reshape(-1)).item())
        ids.append(layer_ids.to(torch.int16).numpy())
        dom.append(np.full(n_win * cfg.seq_len, d, dtype=np.int16))
    return np.concatenate(ids, axis=1), np.concatenate(dom), np.array(loss)


def _loads(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids: [layers, tokens, k] -> assignment counts [layers, experts]."""
    return np.stack([np.bincount(layer.ravel(), minlength=num_experts) for layer in ids])


def _shares(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """ids: [layers, tokens, k] -> each layer's load normalised to sum 1 [layers, experts]."""
    c = _loads(ids, num_experts).astype(float)
    return c / c.sum(1, keepdims=True)


def _top_pair(ids: np.ndarray, num_experts: int) -> tuple[tuple[int, int], float]:
    """ids: [tokens, k] -> the most frequent expert pair and its lift over independence."""
    hot = np.zeros((ids.shape[0], num_experts))  # [T, E] one-hot of each token's picks
    np.put_along_axis(hot, ids.astype(np.int64), 1.0, axis=1)
    co = hot.T @ hot  # [E, E]: tokens picking both experts
    np.fill_diagonal(co, -1)
    i, j = np.unravel_index(np.argmax(co), co.shape)  # first maximum: deterministic ties
    p = hot.mean(0)  # [E] share of tokens picking each expert
    return (int(min(i, j)), int(max(i, j))), float(co[i, j] / (ids.shape[0] * p[i] * p[j]))


def summarize(expert_ids: np.ndarray, num_experts: int, domain: np.ndarray) -> dict[str, Any]:
    """Skew, drift and co-activation of a trace.

    expert_ids: [layers, tokens, k]; domain: [tokens], values 0..D-1. Returns, per layer:

    - ``max_over_mean`` [layers]: hottest expert's load / mean load, whole trace;
    - ``domain_max_over_mean`` [layers]: the same within each domain, averaged over domains;
    - ``domain_l1`` [layers, D, D]: L1 distance of the normalised loads of two domains (0..2);
    - ``drift_l1`` [layers]: that distance between the first and the last domain;
    - ``noise_l1`` [layers]: the same between the halves of the first domain (noise floor);
    - ``top_pair`` int[layers, 2] and ``top_pair_lift`` [layers]: the expert pair most tokens
      pick together, and that count over ``T * p_i * p_j``, the count expected if experts were
      picked independently (``p_e``: share of tokens picking e).
    """
    loads = _loads(expert_ids, num_experts)
    names = np.unique(domain)
    per_domain = [_loads(expert_ids[:, domain == d], num_experts) for d in names]
    shares = np.stack([_shares(expert_ids[:, domain == d], num_experts) for d in names], axis=1)
    domain_l1 = np.abs(shares[:, :, None] - shares[:, None]).sum(-1)  # [L, D, D]
    first = np.flatnonzero(domain == domain[0])
    half = first.size // 2
    pairs = [_top_pair(layer, num_experts) for layer in expert_ids]
    return {
        "max_over_mean": loads.max(1) / loads.mean(1),
        "domain_max_over_mean": np.mean([c.max(1) / c.mean(1) for c in per_domain], axis=0),
        "domain_l1": domain_l1,
        "drift_l1": domain_l1[:, np.searchsorted(names, domain[0]),
                              np.searchsorted(names, domain[-1])],
        "noise_l1": np.abs(_shares(expert_ids[:, first[:half]], num_experts)
                           - _shares(expert_ids[:, first[half:]], num_experts)).sum(1),
        "top_pair": np.array([p for p, _ in pairs]),
        "top_pair_lift": np.array([lift for _, lift in pairs]),
    }


def record_trace(cfg: TraceConfig, corpus: Corpus | None = None,
                 domains: tuple[tuple[str, tuple[str, ...]], ...] = DOMAINS) -> dict[str, Any]:
    """Steps 1-3 end to end; returns the arrays ``save_trace`` writes.

    Seeds torch's global generator; uses ``cfg.threads`` threads, restored afterwards.
    """
    corpus = corpus or collect_corpus(domains=domains)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = MoELM(cfg)
        _, _, loss_untrained = record(model, corpus.heldout, cfg)
        losses = train(model, corpus.train, cfg)
        expert_ids, domain, loss_heldout = record(model, corpus.heldout, cfg)
    finally:
        torch.set_num_threads(threads)
    tail = max(1, cfg.steps // 20)
    return {
        "expert_ids": expert_ids, "num_experts": np.int64(cfg.num_experts),
        "domain": domain, "domains": np.array([name for name, _ in domains]),
        **{k: np.asarray(v) for k, v in asdict(cfg).items()},  # layers, hidden, ..., seed
        "train_loss": losses.astype(np.float32),
        "train_loss_initial": np.float64(losses[0]),
        "train_loss_final": np.float64(losses[-tail:].mean()),
        "heldout_loss_untrained": loss_untrained, "heldout_loss": loss_heldout,
        "corpus": np.array(f"CPython {platform.python_version()} stdlib *.py, sorted; "
                           f"every {HOLDOUT_EVERY}rd domain file held out"),
        "train_bytes": np.int64(corpus.train.size), "train_files": np.int64(corpus.train_files),
        "heldout_files": np.array(corpus.heldout_files),
        "seconds": np.float64(time.perf_counter() - t0),
        "torch_version": np.array(torch.__version__),
        "date": np.array(datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
    }


def save_trace(path: str | Path, arrays: dict[str, Any]) -> Path:
    """Write ``arrays`` with ``np.savez_compressed``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _report(arrays: dict[str, Any]) -> str:
    s = summarize(arrays["expert_ids"], int(arrays["num_experts"]), arrays["domain"])
    loss = arrays["train_loss"]
    lines = [f"train loss {loss[0]:.3f} (step 0) -> {float(arrays['train_loss_final']):.3f} "
             f"(mean of last steps); held-out loss per domain "
             f"{np.round(arrays['heldout_loss_untrained'], 3)} -> "
             f"{np.round(arrays['heldout_loss'], 3)}; {float(arrays['seconds']):.0f} s"]
    s["domain_l1"] = s["domain_l1"].mean(0)  # [D, D], averaged over layers
    lines += [f"{k}: {np.round(v, 3).tolist()}" for k, v in s.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TraceConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--stdlib", type=Path, help="stdlib source directory (default: this Python's)")
    ap.add_argument("--out", type=Path, required=True, help="output .npz path")
    args = vars(ap.parse_args(argv))
    stdlib, out = args.pop("stdlib"), args.pop("out")
    cfg = TraceConfig(**args)
    arrays = record_trace(cfg, collect_corpus(stdlib))
    save_trace(out, arrays)
    sys.stdout.write(_report(arrays) + f"\nwrote {out} ({out.stat().st_size} bytes)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
