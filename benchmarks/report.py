"""Report of the vendor-shift benchmark: Markdown tables, a bar chart and a guide gallery.

:func:`write_report` turns the rows of ``results.csv`` into ``report.md`` and
``heldout_dice.png``; :func:`save_gallery` draws, for a few of a held-out site's
slices, the query, its retrieved guides with their similarity, the prediction and
the ground truth. The cells and tables (:func:`mean_se`, :func:`markdown_table`,
:func:`diagnostics_cells`, :func:`cost_cells`) serve the real-data benchmark's report too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jras_core.models.jras import JRASModel
    from jras_core.site import Site


def as_number(v: Any) -> float:
    """A ``results.csv`` cell as a number (NaN for an empty or unreadable one)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def finite_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The finite numbers in column ``key`` of ``rows``."""
    return [x for x in (as_number(r.get(key)) for r in rows) if math.isfinite(x)]


def mean_std(values: Sequence[float]) -> str:
    """``"0.712 ± 0.021"`` (std over the values), ``"0.712"`` for one value, ``"–"`` for none."""
    if not values:
        return "–"
    m = float(np.mean(values))
    return f"{m:.3f} ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else f"{m:.3f}"


def mean_se(values: Sequence[float], signed: bool = False) -> str:
    """``"0.712 ± 0.012"`` (standard error of the mean), ``"0.712"`` for one value, ``"–"`` for none;
    ``signed``: with its sign, ``"+0.012 ± 0.004"`` (a mean that rounds to zero is ``+0.000``)."""
    if not values:
        return "–"
    m = float(np.mean(values))
    fmt = ".3f"
    if signed:
        m, fmt = (0.0 if abs(m) < 5e-4 else m), "+.3f"  # no "-0.000"
    if len(values) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {float(np.std(values, ddof=1) / math.sqrt(len(values))):.3f}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def heldout_by_seed_mean(rows: Sequence[Mapping[str, Any]], method: str, heldouts: Sequence[str]) -> list[float]:
    """Per seed, the held-out Dice averaged over the held-out vendors (seeds with every vendor only)."""
    out = []
    seeds = sorted({str(r["seed"]) for r in rows if r["method"] == method and r["role"] == "heldout"})
    for s in seeds:
        vals = {r["heldout"]: as_number(r["dice_mean"]) for r in rows
                if r["method"] == method and r["role"] == "heldout" and str(r["seed"]) == s}
        if all(h in vals and math.isfinite(vals[h]) for h in heldouts):
            out.append(float(np.mean([vals[h] for h in heldouts])))
    return out


BASELINE = "fedavg+aug"
"""The method every other one is compared with, seed by seed."""


def paired_differences(rows: Sequence[Mapping[str, Any]], method: str, baseline: str,
                       heldouts: Sequence[str]) -> dict[str, list[float]]:
    """Held-out Dice of ``method`` minus that of ``baseline``, seed by seed (seeds both ran).

    Returns ``{vendor: [difference per seed]}`` for each of ``heldouts`` and ``"mean"``: per
    seed, the difference averaged over the held-out vendors (seeds with every vendor only)."""
    def by_seed(m: str, h: str) -> dict[str, float]:
        return {str(r["seed"]): as_number(r["dice_mean"]) for r in rows
                if r["method"] == m and r["role"] == "heldout" and r["heldout"] == h}

    out: dict[str, list[float]] = {}
    per_seed: dict[str, list[float]] = {}
    for h in heldouts:
        mine, base = by_seed(method, h), by_seed(baseline, h)
        out[h] = []
        for s in sorted(set(mine) & set(base), key=lambda x: (len(x), x)):
            d = mine[s] - base[s]
            if math.isfinite(d):
                out[h].append(d)
                per_seed.setdefault(s, []).append(d)
    out["mean"] = [float(np.mean(v)) for v in per_seed.values() if len(v) == len(heldouts)]
    return out


def write_report(out: Path, rows: Sequence[Mapping[str, Any]], methods: Sequence[str], class_names: Sequence[str],
                 settings: Mapping[str, Any], descriptions: Mapping[str, str]) -> str:
    """Write ``report.md`` and ``heldout_dice.png`` to ``out``; returns the report text."""
    rows = [r for r in rows if r.get("method") in methods]
    heldouts = sorted({r["heldout"] for r in rows})
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    held = [r for r in rows if r["role"] == "heldout"]
    train = [r for r in rows if r["role"] == "train"]
    lines = ["# Vendor-shift benchmark", "",
             (f"Dataset **{settings['dataset']}** (vendors {settings['vendors']}), held-out vendors {settings['heldout']}; "
             f"seeds {settings['seeds']}; {settings['rounds']} rounds x {settings['local_epochs']} local epoch(s), "
             f"{settings['size']} px; held-out support bank of {settings['support']} annotated cases"
             + (f" of {settings['heldout_cases']}" if settings.get("heldout_cases") else "")
             + f"; method config "
             f"`{settings['config']}`, overrides: {settings['overrides']}"
             + (f"; federations start from the weights of `{settings['init']}`" if settings.get("init") else "")
             + "."), "",
             f"Reproduce: `{settings['command']}`", "", "## Methods", ""]
    lines += markdown_table(["method", "what"], [[m, descriptions.get(m, "")] for m in present])

    lines += ["", "## Held-out vendor Dice (mean ± std over seeds)", "",
              ("Each column: that vendor never trained; its site retrieves from its support bank and is evaluated "
              "on its other cases. Last column: the mean over held-out vendors, mean ± standard error over seeds."), ""]
    body = []
    for m in present:
        cells = [mean_std(finite_values([r for r in held if r["method"] == m and r["heldout"] == h], "dice_mean"))
                 for h in heldouts]
        body.append([m, *cells, mean_se(heldout_by_seed_mean(rows, m, heldouts))])
    lines += markdown_table(["method", *[f"held-out {h}" for h in heldouts], "mean over vendors"], body)

    others = [m for m in present if m != BASELINE]
    if BASELINE in present and others:
        lines += ["", f"## Paired difference to {BASELINE} (mean ± standard error over seeds)", "",
                  (f"Held-out Dice of the method minus that of {BASELINE} trained with the same seed; last column: "
                   "per seed, the difference averaged over the held-out vendors. In brackets: seeds ahead / seeds "
                   "compared."), ""]
        body = []
        for m in others:
            diffs = paired_differences(rows, m, BASELINE, heldouts)
            body.append([m, *[f"{mean_se(diffs[h], signed=True)} ({sum(d > 1e-9 for d in diffs[h])}/{len(diffs[h])})"
                              if diffs[h] else "–" for h in [*heldouts, "mean"]]])
        lines += markdown_table(["method", *[f"held-out {h}" for h in heldouts], "mean over vendors"], body)

    lines += ["", "## Held-out Dice per class and HD95 (mean over vendors and seeds)", ""]
    class_cols = [f"dice_{c.lower()}" for c in class_names]
    body = [[m, *[mean_std(finite_values([r for r in held if r["method"] == m], c)) for c in class_cols],
             mean_std(finite_values([r for r in held if r["method"] == m], "hd95_mean"))] for m in present]
    lines += markdown_table(["method", *[f"Dice {c}" for c in class_names], "HD95 mm"], body)

    vendors = sorted({r["site"].split("-", 1)[-1] for r in train})
    lines += ["", "## In-federation validation Dice (mean ± std over held-out choices and seeds)", "",
              ("Each training site's validation cases, with the final model (and, for retrieval methods, the site's "
              "own bank)."), ""]
    body = []
    for m in present:
        cells = [mean_std(finite_values([r for r in train if r["method"] == m and r["site"].endswith(f"-{v}")],
                                        "dice_mean")) for v in vendors]
        body.append([m, *cells, mean_std(finite_values([r for r in train if r["method"] == m], "dice_mean"))])
    lines += markdown_table(["method", *[f"site {v}" for v in vendors], "all sites"], body)

    retrieval = [m for m in present if any(finite_values([r for r in held if r["method"] == m], "guide_dice"))]
    if retrieval:
        lines += ["", "## Retrieval diagnostics on the held-out vendors (mean ± std)", "", DIAGNOSTICS_NOTE, ""]
        lines += markdown_table(["method", *DIAGNOSTICS_HEADER],
                                [[m, *diagnostics_cells([r for r in held if r["method"] == m])] for m in retrieval])

    lines += ["", "## Cost (mean per run)", ""]
    lines += markdown_table(["method", *COST_HEADER], [[m, *cost_cells([r for r in held if r["method"] == m])]
                                                       for m in present])

    chart = out / "heldout_dice.png"
    if held:
        bar_chart(chart, held, present, heldouts)
        lines += ["", f"![held-out Dice per method and vendor]({chart.name})"]
    for h in heldouts:
        if (out / f"gallery-{h}.png").is_file():
            lines += ["", f"![retrieved guides, held-out vendor {h}](gallery-{h}.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


DIAGNOSTICS_HEADER = ["Dice (retrieved)", "retrieval quality", "Dice oracle guides", "Dice random guides",
                      "Dice no guides", "gap closed"]
"""The columns of :func:`diagnostics_cells`."""
DIAGNOSTICS_NOTE = ("retrieval quality: Dice between the query's true mask and its guides' masks; oracle: guides chosen "
                    "by true-mask similarity (the ceiling of any retriever); random: random guides from the same bank "
                    "(does the segmenter use its guides?); gap closed: (retrieved - random) / (oracle - random).")


def diagnostics_cells(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The retrieval diagnostics of ``rows`` (mean ± std): Dice with retrieved guides, retrieval
    quality, Dice with oracle, random and no guides, and the share of the random-to-oracle gap
    that retrieval closes (of the means)."""
    d, o, rnd = (float(np.mean(finite_values(rows, k))) if finite_values(rows, k) else float("nan")
                 for k in ("dice_mean", "dice_oracle", "dice_random"))
    closed = (d - rnd) / (o - rnd) if math.isfinite(o - rnd) and abs(o - rnd) > 1e-6 else float("nan")
    return [*[mean_std(finite_values(rows, k)) for k in ("dice_mean", "guide_dice", "dice_oracle", "dice_random",
                                                          "dice_noguide")],
            "–" if not math.isfinite(closed) else f"{closed:.2f}"]


COST_HEADER = ["wall s", "MB per round", "peak RSS MiB (a client; in-process for local/central)"]
"""The columns of :func:`cost_cells`."""


def cost_cells(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Mean wall seconds, mean MB sent per round and the largest peak RSS of ``rows``."""
    wall = finite_values(rows, "wall_s")
    return [f"{np.mean(wall):.0f}" if wall else "–", _mb(finite_values(rows, "bytes_per_round")),
            _plain(finite_values(rows, "peak_rss_mb"))]


def _mb(values: Sequence[float]) -> str:
    return f"{np.mean(values) / 1e6:.2f}" if values and np.mean(values) > 0 else "–"


def _plain(values: Sequence[float]) -> str:
    return f"{np.max(values):.0f}" if values else "–"


def bar_chart(path: Path, held: Sequence[Mapping[str, Any]], methods: Sequence[str], heldouts: Sequence[str]) -> None:
    """Grouped bars of held-out Dice (mean, std error bars) per method, one group per held-out vendor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(heldouts) * (1 + 0.25 * len(methods))), 4.0))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(heldouts))
    for i, m in enumerate(methods):
        means, stds = [], []
        for h in heldouts:
            v = finite_values([r for r in held if r["method"] == m and r["heldout"] == h], "dice_mean")
            means.append(np.mean(v) if v else np.nan)
            stds.append(np.std(v, ddof=1) if len(v) > 1 else 0.0)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(x, [f"held-out {h}" for h in heldouts])
    ax.set_ylabel("Dice (mean over classes)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Held-out vendor Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _overlay(ax: Any, image: np.ndarray, mask: np.ndarray | None, title: str, num_classes: int) -> None:
    ax.imshow(image, cmap="gray")
    if mask is not None:
        shown = np.ma.masked_where(mask == 0, mask)
        ax.imshow(shown, cmap="jet", vmin=0, vmax=max(1, num_classes - 1), alpha=0.4, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def save_gallery(path: Path, model: JRASModel, site: Site, title: str, n: int = 4) -> Path:
    """For ``n`` of ``site``'s evaluated slices (largest foreground spread over the set): the
    query, its K retrieved guides (mask overlaid, retrieval similarity in the title), the
    prediction (as evaluation makes it) and the ground truth. ``site.bank`` must hold
    current embeddings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from jras_core.training.evaluate import predict

    cfg = site.method
    c = cfg.labels.num_classes
    val = site.val_set
    fg = (val.masks > 0).flatten(1).sum(1)
    candidates = torch.nonzero(fg > 0).flatten()
    if len(candidates) == 0:
        candidates = torch.arange(len(val))
    pick = candidates[torch.linspace(0, len(candidates) - 1, min(n, len(candidates))).round().long()]
    pred, used = predict(model, val.subset(pick), cfg, site.bank if cfg.uses_retrieval else None, exclude_own_case=False)
    guides = used[0] if used else None
    k = guides.idx.shape[1] if guides is not None else 0
    cols = 3 + k
    fig, axes = plt.subplots(len(pick), cols, figsize=(1.8 * cols, 1.9 * len(pick)), squeeze=False)
    for row, i in enumerate(pick.tolist()):
        img = val.images[i, 0].numpy()
        _overlay(axes[row, 0], img, None, f"query ({val.cases[int(val.case_ids[i])]})", c)
        for j in range(k):
            ok = int(guides.idx[row, j]) >= 0
            _overlay(axes[row, 1 + j], guides.images[row, j, 0].numpy(), guides.masks[row, j].numpy() if ok else None,
                     f"guide {j + 1}: sim {float(guides.sims[row, j]):.2f}" if ok else "no guide", c)
        _overlay(axes[row, cols - 2], img, pred[row].numpy(), "prediction", c)
        _overlay(axes[row, cols - 1], img, val.masks[i].numpy(), "ground truth", c)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["as_number", "bar_chart", "cost_cells", "diagnostics_cells", "finite_values", "markdown_table", "mean_se",
           "mean_std", "save_gallery", "write_report"]
