"""The reproduction's figures, drawn with matplotlib (the optional extra: pip install -e '.[bench]').

    python -m bench.reproduce --out DIR     # draws them (with the tables) when matplotlib is installed

Each figure is written as PNG and SVG, with the same bytes on every run of the same data and matplotlib
version (no dates in the metadata, a fixed SVG id salt, the non-interactive Agg backend):

- ``quality_vs_diversity_<domain>``: every MoA composition of the fit as a point, quality (mean proposal
  accuracy) across, diversity (Vendi score) up, coloured by the aggregate accuracy; Self-MoA of each
  model as a star. The analogue of the paper's quality/diversity scatter.
- ``accuracy_vs_samples``: accuracy against the number of samples, one colour per domain, solid for
  Self-MoA-Seq and dashed for one-shot aggregation of all samples.
- ``table3``: the Table 3 analogue as grouped bars, one group per proposer mix, one bar per domain;
  Self-MoA bars hatched.

Nothing here imports matplotlib at import time: ``pyplot()`` does, and raises ImportError without it.
"""

from __future__ import annotations

import os

DOMAINS = ("MMLU", "CRUX", "MATH")
SUBTITLE = "simulation with mock models"
# Fixed settings, so that the files do not depend on the user's matplotlibrc and are reproducible.
STYLE = {"svg.hashsalt": "selfmoa-reproduce", "svg.fonttype": "none", "font.family": "DejaVu Sans",
         "font.size": 10, "axes.titlesize": 11, "figure.dpi": 100, "savefig.dpi": 100, "path.simplify": False}
COLOURS = {"MMLU": "#1f77b4", "CRUX": "#d62728", "MATH": "#2ca02c", "avg": "#7f7f7f"}
MODEL_NAMES = {"i": "generalist", "d": "coder", "m": "mathematician", "j": "generalist-2"}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save(fig, out: str, stem: str) -> list[str]:
    """Write ``fig`` as ``stem.png`` and ``stem.svg`` without dates or versions in them; returns the names."""
    names = [f"{stem}.png", f"{stem}.svg"]
    fig.savefig(os.path.join(out, names[0]), metadata={"Software": None})
    fig.savefig(os.path.join(out, names[1]), metadata={"Date": None, "Creator": None})
    return names


def quality_vs_diversity(plt, results: dict, domain: str):
    """One domain's compositions: quality across, diversity up, aggregate accuracy as colour."""
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    mixed = [p for p in results["table4_points"][domain] if len(set(p["mix"])) > 1]
    single = results["self_moa_points"][domain]
    scores = [p["score"] for p in mixed + single]
    norm = Normalize(min(scores), max(scores))
    fit = results["table4"][domain]
    fig, ax = plt.subplots(figsize=(7, 5.4), layout="constrained")
    dots = ax.scatter([p["quality"] for p in mixed], [p["diversity"] for p in mixed], c=[p["score"] for p in mixed],
                      cmap="viridis", norm=norm, s=45, edgecolors="white", linewidths=0.5)
    ax.scatter([p["quality"] for p in single], [p["diversity"] for p in single], c=[p["score"] for p in single],
               cmap="viridis", norm=norm, marker="*", s=320, edgecolors="black", linewidths=1.0)
    for p in single:
        ax.annotate(MODEL_NAMES[p["mix"][0]], (p["quality"], p["diversity"]), textcoords="offset points",
                    xytext=(9, -4), fontsize=9)
    colour_bar = fig.colorbar(dots, ax=ax)
    colour_bar.set_label("aggregate accuracy (%)")
    ax.set_xlabel("quality: mean accuracy of the 6 proposals (%)")
    ax.set_ylabel("diversity: Vendi score of the 6 proposals\n(effective number of distinct proposals, 1 to 6)")
    ax.set_title(f"{domain}: MoA compositions, aggregator generalist ({SUBTITLE})\n"
                 f"fit on standardised inputs: a (quality) = {fit['a']:.2f}, b (diversity) = {fit['b']:.2f}, "
                 f"R\u00b2 = {fit['r2']:.2f}")
    ax.grid(alpha=0.3)
    distinct = len({p["mix"] for p in mixed})
    fig.legend(handles=[Line2D([], [], linestyle="", marker="o", markersize=7, color="grey",
                               label=f"mixed MoA: 6 proposers drawn from i, d, m, j ({distinct} distinct of "
                                     f"{len(mixed)} draws)"),
                        Line2D([], [], linestyle="", marker="*", markersize=15, color="grey", markeredgecolor="black",
                               label="Self-MoA: one model sampled 6 times")],
               loc="outside lower center", ncol=1, fontsize=9)
    ax.margins(x=0.08, y=0.1)
    return fig


def accuracy_vs_samples(plt, results: dict):
    """Accuracy against n: one colour per domain, Self-MoA-Seq solid, one-shot Self-MoA dashed."""
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.6), layout="constrained")
    counts = []
    for domain, kinds in results["seq"].items():
        counts = sorted(kinds["seq"])
        for kind, style in (("seq", "-"), ("one-shot", "--")):
            ax.plot(counts, [kinds[kind][n] for n in counts],
                    linestyle=style, marker="o", markersize=4, color=COLOURS[domain], linewidth=1.8)
    ax.set_xticks(counts)
    ax.set_xlabel("number of samples n (of the best model for the domain)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Self-MoA-Seq vs one-shot Self-MoA as samples grow ({SUBTITLE},\n"
                 f"{results['questions_per_domain']} questions per domain; Seq: window 6, carry 3)")
    ax.grid(alpha=0.3)
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.25 * (high - low), high)  # room for the legend under the lines
    domains = ax.legend(handles=[Line2D([], [], color=COLOURS[d], linewidth=2.5, label=d) for d in results["seq"]],
                        title="domain", loc="lower left", ncol=3, fontsize=9, framealpha=0.9)
    ax.add_artist(domains)  # a second legend would otherwise replace it
    ax.legend(handles=[Line2D([], [], color="black", linestyle="-", label="Self-MoA-Seq (sliding window)"),
                       Line2D([], [], color="black", linestyle="--", label="one-shot Self-MoA (all n at once)")],
              title="aggregation", loc="lower right", fontsize=9, framealpha=0.9)
    return fig


def table3_bars(plt, results: dict):
    """Table 3 as grouped bars: a group per proposer mix, a bar per domain (and the average)."""
    from matplotlib.patches import Patch

    rows = results["table3"]
    columns = (*DOMAINS, "avg")
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(11, 4.8), layout="constrained")
    for g, (label, row) in enumerate(rows.items()):
        self_moa, alone = label.startswith("Self-MoA"), label.endswith("alone")
        for k, column in enumerate(columns):
            ax.bar(g + (k - (len(columns) - 1) / 2) * width, row[column], width, color=COLOURS[column],
                   alpha=0.45 if alone else 1.0, hatch="///" if self_moa else None,
                   edgecolor="black" if self_moa else "white", linewidth=0.6)
    names = [label.replace("Self-MoA, best model per task", "Self-MoA\nbest per task")
             .replace("Self-MoA ", "Self-MoA\n").replace("mixed ", "mixed\n").replace(" alone", "\nalone")
             for label in rows]
    ax.set_xticks(range(len(rows)), names, fontsize=9)
    ax.set_xlabel("proposers (i = generalist, d = coder, m = mathematician; 6 proposals, aggregator i; "
                  "'alone': one sample, no aggregation)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Table 3 analogue: accuracy per proposer mix and domain ({SUBTITLE}, "
                 f"{results['questions_per_domain']} questions per domain)")
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=COLOURS[c], label=c if c != "avg" else "average") for c in columns]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="Self-MoA"),
                Patch(facecolor=COLOURS["MMLU"], alpha=0.45, label="pale: one sample, no aggregation")]
    ax.legend(handles=handles, loc="upper left", ncol=6, fontsize=9, framealpha=0.9)
    return fig


def draw(results: dict, out: str, plt=None) -> list[str]:
    """Draw every figure into ``out`` as PNG and SVG; returns the file names. Needs matplotlib."""
    plt = plt or pyplot()
    os.makedirs(out, exist_ok=True)
    figures = [(f"quality_vs_diversity_{d}", lambda d=d: quality_vs_diversity(plt, results, d)) for d in DOMAINS]
    figures += [("accuracy_vs_samples", lambda: accuracy_vs_samples(plt, results)),
                ("table3", lambda: table3_bars(plt, results))]
    written = []
    with plt.rc_context(STYLE):
        for stem, make in figures:
            fig = make()
            try:
                written += save(fig, out, stem)
            finally:
                plt.close(fig)
    return written
