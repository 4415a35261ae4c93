"""The main job's picture: loss per step for each backend, and bytes per GPU per layer, measured
against predicted."""
from __future__ import annotations


def plot(path: str, results: dict, predicted: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, r), marker in zip(results.items(), ("o", "x")):  # the curves coincide: tell them by marker
        steps = range(len(r["losses"]))
        ax_loss.plot(steps, r["losses"], marker=marker, markersize=9, label=name)
        ax_loss.set_xticks(list(steps))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    names = list(results)
    xs = range(len(names))
    ax_bytes.bar([x - 0.2 for x in xs], [results[n]["bytes_per_layer"] / 1024 for n in names], 0.4, label="measured")
    ax_bytes.bar([x + 0.2 for x in xs], [predicted[n] / 1024 for n in names], 0.4, label="predicted")
    ax_bytes.set_xticks(list(xs), names)
    ax_bytes.set_ylabel("KiB sent per GPU per layer per step")
    ax_bytes.legend()
    world = next(iter(results.values()))["world"]
    fig.suptitle(f"tiny GPT on {world} ranks: lightseq (CP) vs Megatron TP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
