"""Validation folds by domain: the assignment, and how balanced it is.

Which validation fold each training domain goes to (docs/data-format.md, "Folds").

The test set is 10 unseen domains whose class frequencies differ strongly from train, so a fold must
hold out whole domains. With only 40 domains of very different landscapes, a plain GroupKFold (which
balances sizes only, `groupkfold_folds`, kept as the reference) easily puts most vineyards or most water
in one fold; `assign_folds` is a seeded search that balances both the patch counts and the per-class
pixel distributions, measured by the Jensen-Shannon divergence (base 2, in bits: 0 = same distribution,
1 = disjoint) of each fold's distribution from the distribution of all training pixels. `hf_folds` is
the Hugging Face card's fixed split.

How balanced a fold assignment is: per-fold class pixel counts and divergence, the text printed by
`make folds`, and DATA/folds.png (stacked class bars per fold, official colours)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.files import save_figure
from src.core.flair import CLASS_COLORS_HEX, CLASS_NAMES, NUM_CLASSES
from src.core.tables import train_index, write_folds
from src.prep.class_hist import HIST_COLS, class_histograms, domain_table

# Hugging Face card's fixed split (docs/data-format.md, "Folds"): these 8 domains are validation, the 32
# others train. One source names D070 instead of D077 [?]. The real train set holds both D070_2020 and
# D077_2021, so taking both would give 9/31; D077 is used when present (the 32/8 split of the card) and
# D070 replaces it only when D077 is absent from the index.
HF_VAL_DOMAINS: tuple[str, ...] = ("D004", "D014", "D029", "D031", "D058", "D066", "D067", "D077")
HF_ALTERNATES: dict[str, str] = {"D077": "D070"}


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits between the rows of `p` (..., C) and one distribution q (C,).

    Rows are normalised here; an all-zero row (no labelled pixel) counts as 1 bit, the maximum.
    """
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    q = np.asarray(q, dtype=np.float64)
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(p), where=a > 0)
        return np.sum(a * np.log2(ratio), axis=-1)

    js = 0.5 * kl(p) + 0.5 * kl(np.broadcast_to(q, p.shape))
    return np.where(total[..., 0] > 0, js, 1.0)


class _Problem:
    """Fold cost of a domain -> fold assignment: mean over folds of
    JS(fold distribution || overall) + size_weight * (fold patches / (N / K) - 1)^2."""

    def __init__(self, pixels: np.ndarray, patches: np.ndarray, k: int, size_weight: float):
        self.x = pixels.astype(np.float64)
        self.n = patches.astype(np.float64)
        self.k = k
        self.w = size_weight
        self.q = self.x.sum(axis=0) if self.x.sum() > 0 else np.ones(self.x.shape[1])

    def fold_cost(self, sums: np.ndarray, sizes: np.ndarray, target: float) -> np.ndarray:
        return js_divergence(sums, self.q) + self.w * (sizes / max(target, 1e-9) - 1.0) ** 2

    def cost(self, assign: np.ndarray) -> float:
        sums = np.zeros((self.k, self.x.shape[1]))
        np.add.at(sums, assign, self.x)
        sizes = np.bincount(assign, weights=self.n, minlength=self.k)
        return float(self.fold_cost(sums, sizes, self.n.sum() / self.k).mean())

    def greedy(self, order: np.ndarray, first_folds: np.ndarray) -> np.ndarray:
        """Place domains in `order`: the first K in distinct folds, each next one where the cost of the
        partial assignment (size target = assigned patches / K) is lowest."""
        d, k = len(self.x), self.k
        assign = np.full(d, -1)
        sums = np.zeros((k, self.x.shape[1]))
        sizes = np.zeros(k)
        for step, i in enumerate(order):
            if step < k:
                f = int(first_folds[step])
            else:
                target = (sizes.sum() + self.n[i]) / k
                base = self.fold_cost(sums, sizes, target)
                new = self.fold_cost(sums + self.x[i], sizes + self.n[i], target)
                total = base.sum() - base + new  # cost if domain i goes to fold f, for every f
                f = int(np.argmin(total))
            assign[i] = f
            sums[f] += self.x[i]
            sizes[f] += self.n[i]
        return assign

    def local_search(self, assign: np.ndarray, max_steps: int = 10_000) -> np.ndarray:
        """Best-improvement moves (one domain to another fold) and swaps (two domains) until none helps.
        A fold is never emptied."""
        x, n, k = self.x, self.n, self.k
        target = n.sum() / k
        assign = assign.copy()
        idx = np.arange(len(x))
        for _ in range(max_steps):
            sums = np.zeros((k, x.shape[1]))
            np.add.at(sums, assign, x)
            sizes = np.bincount(assign, weights=n, minlength=k)
            members = np.bincount(assign, minlength=k)
            cur = self.fold_cost(sums, sizes, target)
            a = assign
            # moves: domain i from fold a[i] to fold f
            src = self.fold_cost(sums[a] - x, sizes[a] - n, target) - cur[a]  # (D,)
            dst = self.fold_cost(sums[None] + x[:, None], sizes[None] + n[:, None], target) - cur[None]
            move = src[:, None] + dst  # (D, K)
            move[idx, a] = np.inf
            move[members[a] <= 1] = np.inf
            # swaps: domain i (fold a[i]) <-> domain j (fold a[j])
            diff = x[None] - x[:, None]  # x_j - x_i
            dn = n[None] - n[:, None]
            swap = (self.fold_cost(sums[a][:, None] + diff, sizes[a][:, None] + dn, target) - cur[a][:, None]
                    + self.fold_cost(sums[a][None] - diff, sizes[a][None] - dn, target) - cur[a][None])
            swap[a[:, None] == a[None]] = np.inf
            best_move, best_swap = move.min(), swap.min()
            if min(best_move, best_swap) >= -1e-12:
                break
            if best_move <= best_swap:
                i, f = np.unravel_index(int(np.argmin(move)), move.shape)
                assign[i] = f
            else:
                i, j = np.unravel_index(int(np.argmin(swap)), swap.shape)
                assign[i], assign[j] = assign[j], assign[i]
        return assign


def _canonical(assign: np.ndarray) -> tuple[int, ...]:
    """Relabel folds in order of first appearance over the sorted domains (a partition's one name)."""
    labels: dict[int, int] = {}
    return tuple(labels.setdefault(int(f), len(labels)) for f in assign)


def check_k(k: int, domains: list[str]) -> None:
    """A fold holds whole domains: 2 <= K <= number of domains (checked before any mask is read)."""
    if k < 2:
        raise ValueError(f"K={k}: need at least 2 folds")
    if k > len(domains):
        raise ValueError(f"K={k} folds but only {len(domains)} training domains "
                         f"({' '.join(domains)}): a fold holds whole domains, use K <= {len(domains)} "
                         f"(make folds K={len(domains)})")


def assign_folds(hist_by_domain: pd.DataFrame, k: int, seed: int, restarts: int = 64,
                 size_weight: float = 1.0, tolerance: float = 0.05) -> dict[str, int]:
    """Stratified group k-fold over domains: {domain: fold 0..k-1}.

    `hist_by_domain`: one row per domain (index = domain name) with class pixel counts c0..c12 and
    optionally `patches` (else pixel totals stand for size). Each of `restarts` seeded restarts runs a
    greedy placement (restart 0 largest domains first, the others in randomly perturbed size order)
    then a local search of moves and swaps minimising the mean over folds of
    JS(fold || all) + size_weight * (relative patch-count deviation)^2. Among the distinct partitions
    found whose cost is within `tolerance` (relative) of the best, the seed picks one: the same seed
    always gives the same folds, another seed an equally balanced alternative when one exists.
    Inputs are sorted by domain first, so row order never matters.
    """
    table = hist_by_domain.sort_index()
    domains = [str(d) for d in table.index]
    if len(set(domains)) != len(domains):
        raise ValueError("hist_by_domain has duplicate domains")
    check_k(k, domains)
    pixels = table[HIST_COLS].to_numpy(dtype=np.float64)
    patches = (table["patches"] if "patches" in table else table[HIST_COLS].sum(axis=1)).to_numpy(float)
    problem = _Problem(pixels, patches, k, size_weight)
    rng = np.random.default_rng(seed)
    found: dict[tuple[int, ...], float] = {}
    for r in range(max(1, restarts)):
        noise = np.ones(len(domains)) if r == 0 else rng.uniform(0.5, 1.5, len(domains))
        order = np.lexsort((np.arange(len(domains)), -patches * noise))
        assign = problem.local_search(problem.greedy(order, rng.permutation(k)))
        key = _canonical(assign)
        found[key] = problem.cost(np.array(key))
    best = min(found.values())
    pool = sorted((c, key) for key, c in found.items() if c <= best * (1 + tolerance) + 1e-12)
    chosen = pool[int(rng.integers(len(pool)))][1]
    return {d: int(f) for d, f in zip(domains, chosen)}


def groupkfold_folds(hist_by_domain: pd.DataFrame, k: int) -> dict[str, int]:
    """sklearn's GroupKFold over the patches grouped by domain (balances sizes only): the reference."""
    from sklearn.model_selection import GroupKFold

    table = hist_by_domain.sort_index()
    domains = [str(d) for d in table.index]
    check_k(k, domains)
    sizes = (table["patches"] if "patches" in table else table[HIST_COLS].sum(axis=1)).to_numpy(int)
    groups = np.repeat(np.arange(len(domains)), np.maximum(sizes, 1))
    out: dict[str, int] = {}
    for f, (_, val) in enumerate(GroupKFold(n_splits=k).split(groups, groups=groups)):
        for g in np.unique(groups[val]):
            out[domains[g]] = f
    return out


def domain_prefix(domain: str) -> str:
    """'D004_2021' -> 'D004' (real names carry a year; the HF card lists only the prefix)."""
    return str(domain).split("_")[0]


def hf_folds(domains: Iterable[str]) -> dict[str, int]:
    """The Hugging Face card's fixed split as one fold: 0 = its 8 validation domains, 1 = all others.

    Training FOLD=0 therefore trains on the card's 32 train domains and validates on its 8 validation
    domains; fold 1 only marks the training side (FOLD=1 would swap the roles: not the card's split).
    """
    domains = sorted(str(d) for d in domains)
    present = {domain_prefix(d) for d in domains}
    wanted = []
    for prefix in HF_VAL_DOMAINS:
        alt = HF_ALTERNATES.get(prefix)
        if prefix in present or alt is None or alt not in present:
            wanted.append(prefix)
        else:
            print(f'hf scheme: {prefix} absent, using {alt} instead (docs/data-format.md, "Folds")')
            wanted.append(alt)
    out = {d: 0 if domain_prefix(d) in wanted else 1 for d in domains}
    val = [d for d, f in out.items() if f == 0]
    absent = [p for p in wanted if p not in present]
    if not val:
        raise ValueError(f"hf scheme: none of the validation domains {' '.join(wanted)} is in the training "
                         f"index (domains: {' '.join(domains)}); use --scheme stratified")
    if len(val) == len(domains):
        raise ValueError("hf scheme: every training domain is a validation domain; no training domain left")
    if absent:
        warnings.warn(f"hf scheme: validation domains absent from the index: {' '.join(absent)}",
                      stacklevel=2)
    return out

def folds_frame(index_df: pd.DataFrame, assignment: Mapping[str, int]) -> pd.DataFrame:
    """The folds table: one row per training patch (id, domain, zone, fold), sorted by id."""
    folds = index_df[["id", "domain", "zone"]].astype(str).sort_values("id", kind="stable")
    folds["fold"] = folds["domain"].map(assignment)
    if folds["fold"].isna().any():
        lost = sorted(folds.loc[folds["fold"].isna(), "domain"].unique())
        raise ValueError(f"domains without a fold: {lost}")
    folds["fold"] = folds["fold"].astype(int)
    return folds


def fold_stats(table: pd.DataFrame, assignment: Mapping[str, int]) -> pd.DataFrame:
    """Per fold (index 0..K-1): domains (space-separated), patches, c0..c12 pixel counts, js (bits)."""
    missing = [d for d in table.index if d not in assignment]
    if missing:
        raise ValueError(f"domains without a fold: {missing}")
    folds = pd.Series({d: assignment[d] for d in table.index}, name="fold")
    stats = table.groupby(folds)[HIST_COLS + ["patches"]].sum()
    names = {f: " ".join(sorted(d for d in table.index if assignment[d] == f)) for f in stats.index}
    stats.insert(0, "domains", [names[f] for f in stats.index])
    stats["js"] = js_divergence(stats[HIST_COLS].to_numpy(), table[HIST_COLS].sum().to_numpy())
    return stats


def summarize(stats: pd.DataFrame) -> tuple[float, float]:
    """(mean JS divergence in bits, largest relative patch-count deviation from N/K)."""
    sizes = stats["patches"].to_numpy(float)
    return float(stats["js"].mean()), float(np.abs(sizes / sizes.mean() - 1).max())


def report(stats: pd.DataFrame, table: pd.DataFrame) -> str:
    """The per-fold text printed by the CLI: domains, patches, class percentages, divergence."""
    short = [name.split()[0][:6] for name in CLASS_NAMES]
    lines = [f"{'fold':>4} {'patches':>8} {'JS bits':>8} " + " ".join(f"{s:>6}" for s in short)]

    def row(name: str, patches: int, js: str, pixels: np.ndarray) -> str:
        pct = 100 * pixels / max(pixels.sum(), 1)
        return f"{name:>4} {patches:>8} {js:>8} " + " ".join(f"{p:6.2f}" for p in pct)

    for f, r in stats.iterrows():
        lines.append(row(str(f), int(r["patches"]), f"{r['js']:.5f}", r[HIST_COLS].to_numpy(float)))
    lines.append(row("all", int(table["patches"].sum()), "-", table[HIST_COLS].sum().to_numpy(float)))
    lines.append("class columns: % of labelled pixels; JS = Jensen-Shannon divergence (base 2, bits) of the "
                 "fold's class distribution from all training pixels")
    for f, r in stats.iterrows():
        lines.append(f"fold {f}: {len(r['domains'].split())} domains: {r['domains']}")
    return "\n".join(lines)


def plot_folds(stats: pd.DataFrame, table: pd.DataFrame, path: str | os.PathLike, title: str = "") -> None:
    """Stacked bars of the class distribution per fold (plus all training pixels), official colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = np.vstack([stats[HIST_COLS].to_numpy(float), table[HIST_COLS].sum().to_numpy(float)])
    pct = 100 * pixels / np.maximum(pixels.sum(axis=1, keepdims=True), 1)
    labels = [f"fold {f}\n{int(n)} patches\nJS {js:.4f}"
              for f, n, js in zip(stats.index, stats["patches"], stats["js"])]
    labels.append(f"all\n{int(table['patches'].sum())} patches")
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3.5, 5.5))
    bottom = np.zeros(len(labels))
    for c in range(NUM_CLASSES):
        ax.bar(labels, pct[:, c], bottom=bottom, color=CLASS_COLORS_HEX[c], edgecolor="0.3", linewidth=0.3,
               label=CLASS_NAMES[c])
        bottom += pct[:, c]
    ax.set_ylabel("% of labelled pixels")
    ax.set_ylim(0, 100)
    ax.set_title(title or "class distribution per fold (JS: Jensen-Shannon divergence from all, bits)")
    handles, names = ax.get_legend_handles_labels()  # reversed: legend top = top of the stack
    ax.legend(handles[::-1], names[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
              frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------------------ the step
SCHEMES = ("stratified", "hf")  # the domain search, or the Hugging Face mirror's fixed split


def make_folds(data_dir: str | os.PathLike, k: int = 5, seed: int = 42, scheme: str = "stratified",
               workers: int | None = None, restarts: int = 64, plot: bool = True) -> pd.DataFrame:
    """The whole `make folds` step; returns the folds table that was written."""
    data_dir = Path(data_dir)
    index_df = train_index(data_dir)
    if scheme == "stratified":  # fail before reading any mask
        check_k(k, sorted(index_df["domain"].astype(str).unique()))
    hist = class_histograms(index_df, data_dir / "class_hist.csv", workers)
    table = domain_table(index_df, hist)
    if scheme == "stratified":
        assignment = assign_folds(table, k, seed, restarts=restarts)
    elif scheme == "hf":
        if k != 2:
            print(f"hf scheme: fixed split, K={k} ignored "
                  "(fold 0 = HF validation domains, fold 1 = the rest)")
        assignment = hf_folds(table.index)
    else:
        raise ValueError(f"unknown scheme {scheme!r} ({' | '.join(SCHEMES)})")
    folds = folds_frame(index_df, assignment)
    write_folds(folds, data_dir / "folds.csv")
    folds = folds.reset_index(drop=True)
    stats = fold_stats(table, assignment)
    print(f"scheme {scheme}: {len(table)} domains, {len(folds)} patches -> {len(stats)} folds"
          + (f" (K={k}, seed={seed})" if scheme == "stratified" else ""))
    print(report(stats, table))
    js, dev = summarize(stats)
    print(f"mean JS divergence {js:.5f} bits, largest patch-count deviation {100 * dev:.1f}%")
    if scheme == "stratified":
        ref_js, ref_dev = summarize(fold_stats(table, groupkfold_folds(table, k)))
        print(f"sklearn GroupKFold on domains: mean JS divergence {ref_js:.5f} bits, "
              f"largest patch-count deviation {100 * ref_dev:.1f}%")
    else:
        print("FOLD=0 trains on fold 1 (HF train domains) and validates on fold 0 (HF validation domains)")
    if plot:
        plot_folds(stats, table, data_dir / "folds.png", title=f"class distribution per fold ({scheme})")
    print(f"wrote {data_dir / 'folds.csv'}" + (f", {data_dir / 'folds.png'}" if plot else ""))
    return folds
