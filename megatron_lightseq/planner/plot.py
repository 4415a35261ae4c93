"""``plan --plot``: a search's tokens/s per GPU and memory per configuration, or the per-layer
table's time and bytes per system against the sequence length (needs matplotlib)."""
from __future__ import annotations

from .model import Machine, ModelSpec, token_label
from .search import SYSTEMS, Result

# Every series gets its own marker and dash pattern (and colour), whatever series the rows hold:
# two with equal values (zigzag/ring and zigzag/lightseq at long sequences) still both show.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">")
DASHES = ("-", "--", ":", "-.")


def save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def search_figure(result: Result, model: ModelSpec, m: Machine, count: int = 12):
    """Left: every configuration that fits, memory against tokens/s per GPU; right: the top
    ``count`` of each system, tokens/s per GPU, each bar labelled with its memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_all, ax_top) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 1.3]})
    for i, system in enumerate(SYSTEMS):
        mine = result.ranked(system)
        ax_all.scatter([e.memory.total / 2**30 for e in mine], [e.tokens_per_s_per_gpu for e in mine], s=14,
                       color=f"C{i}", marker=MARKERS[i], alpha=0.6, label=f"{system} ({len(mine)} fit)")
        if mine:
            best = mine[0]
            ax_all.annotate(f"{system} best: {best.config.name}", (best.memory.total / 2**30, best.tokens_per_s_per_gpu),
                            fontsize=7, xytext=(4, 4 + 10 * i), textcoords="offset points")
    ax_all.axvline(m.budget_bytes / 2**30, color="k", linestyle=":", label=f"usable {m.budget_bytes / 2**30:.0f} GiB")
    ax_all.set_xlabel("predicted memory per GPU (GiB)")
    ax_all.set_ylabel("predicted tokens/s per GPU")
    ax_all.legend(fontsize=8)
    ax_all.grid(True, alpha=0.3)
    bars = [(s, e) for s in SYSTEMS for e in result.ranked(s)[:count]]
    y = range(len(bars))
    ax_top.barh(list(y), [e.tokens_per_s_per_gpu for _, e in bars], color=[f"C{SYSTEMS.index(s)}" for s, _ in bars])
    ax_top.set_yticks(list(y), [f"{s[:1].upper()} {e.config.name}" for s, e in bars], fontsize=7)
    for i, (_, e) in enumerate(bars):
        ax_top.text(e.tokens_per_s_per_gpu, i, f" {e.memory.total / 2**30:.0f} GiB", va="center", fontsize=6)
    ax_top.invert_yaxis()
    ax_top.set_xlabel("predicted tokens/s per GPU (label: memory per GPU); L = lightseq, M = megatron")
    ax_top.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"{model.name}, {token_label(result.seq)} tokens, global batch {result.global_batch}, {result.gpus} "
                 f"GPUs ({result.gpus_per_node} per node): predictions, not measurements", fontsize=10)
    fig.tight_layout()
    return fig


def layer_figure(by_seq, model: ModelSpec, m: Machine, title: str):
    """Predicted time and bytes per layer against the sequence length, one series per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    seqs = list(by_seq)
    systems = [r.system for r in by_seq[seqs[0]]]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 5))
    for i, name in enumerate(systems):
        rows = [by_seq[s][i] for s in seqs]
        oom = [r.seq for r in rows if r.memory_bytes > m.budget_bytes]
        label = name + (f" (OOM from {token_label(oom[0])})" if oom else "")
        style = dict(marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)], markerfacecolor="none",
                     markersize=7, color=f"C{i % 10}", label=label)
        ax_t.plot(seqs, [r.seconds * 1e3 for r in rows], **style)
        ax_b.plot(seqs, [r.traffic_bytes / 2**20 for r in rows], **style)
    for ax, label in ((ax_t, "predicted ms per layer, forward + backward"),
                      (ax_b, "MiB a GPU sends per layer, forward + backward")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [token_label(s) for s in seqs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
