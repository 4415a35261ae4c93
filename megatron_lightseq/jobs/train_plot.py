"""The main job's picture, what its text prints: loss per step for each backend; bytes per GPU per
layer, measured against predicted, and TP's bytes outside the layers; tokens per second."""
from __future__ import annotations


def plot(path: str, results: dict, predicted: dict, *, on_cpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(results, predicted, on_cpu=on_cpu)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(results: dict, predicted: dict, *, on_cpu: bool):
    """``results``: train's per backend (losses, tokens_per_s, bytes_per_layer, bytes_outside_layers,
    world); ``predicted``: bytes per layer per backend."""
    import matplotlib.pyplot as plt

    names = list(results)
    steps = len(next(iter(results.values()))["losses"])
    fig, (ax_loss, ax_bytes, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=(4, 4, 2.5))
    for (name, r), marker in zip(results.items(), ("o", "x")):  # the curves coincide: tell them by marker
        ax_loss.plot(range(steps), r["losses"], marker=marker, markersize=9, label=name)
    ax_loss.set_xticks(list(range(steps)))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    # random tokens and a new batch each step: nothing to learn, the loss stays near ln(vocab)
    ax_loss.set_title("loss per step (uniform random tokens: it need not fall)", fontsize=9)
    ax_loss.legend()

    xs = range(len(names))
    kib = lambda values: [v / 1024 for v in values]
    bars = [ax_bytes.bar([x - 0.27 for x in xs], kib(results[n]["bytes_per_layer"] for n in names), 0.27,
                         color="0.35", label="in the layers, measured (per layer)"),
            ax_bytes.bar(list(xs), kib(predicted[n] for n in names), 0.27, color="0.7",
                         label="in the layers, predicted (per layer)")]
    outside = kib(results[n]["bytes_outside_layers"] for n in names)
    if any(outside):  # TP's embedding, output layer and loss collectives: per step, whatever the layer count
        bars.append(ax_bytes.bar([x + 0.27 for x in xs], outside, 0.27, hatch="//", color="white",
                                 edgecolor="grey", label="outside the layers (per step): embedding, output, loss"))
    for b in bars:
        ax_bytes.bar_label(b, fmt="%.0f", fontsize=7)
    ax_bytes.set_ylim(top=1.5 * max(bar.get_height() for b in bars for bar in b))  # room for the legend
    ax_bytes.set_xticks(list(xs), names)
    ax_bytes.set_ylabel("KiB sent per GPU per step (busiest GPU)")
    # lightseq replicates the weights over CP, TP splits them: only lightseq all-reduces gradients
    ax_bytes.set_title("bytes per GPU (not counted: lightseq's gradient all-reduce over CP)", fontsize=9)
    ax_bytes.legend(fontsize=7, loc="upper left")

    # each backend in its loss curve's colour; grey bars are bytes, not backends
    speed = ax_speed.bar(list(xs), [results[n]["tokens_per_s"] for n in names], 0.5,
                         color=[f"C{i}" for i in range(len(names))])
    ax_speed.bar_label(speed, fmt="%.0f", fontsize=8)
    ax_speed.set_xticks(list(xs), names)
    ax_speed.set_ylabel("tokens per second")
    ax_speed.set_title("tokens/s on CPU processes: not the GPU case\n(README: why; plan predicts GPUs)" if on_cpu
                       else "tokens/s", fontsize=9)

    world = next(iter(results.values()))["world"]
    fig.suptitle(f"tiny GPT on {world} ranks: lightseq (CP = {world}) vs Megatron TP = {world}")
    fig.tight_layout()
    return fig
