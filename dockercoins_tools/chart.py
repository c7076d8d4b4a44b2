"""The experiment's chart: measured hashes/s per worker count beside the expected model."""

from pathlib import Path
from typing import Any

from dockercoins_tools.cost_model import Costs, expected_rate

COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def draw_experiment(data: dict[str, Any], path: Path) -> None:
    """Draw the points of an experiment's JSON (as `Experiment.as_json` writes it) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    costs = Costs(**data["costs"])
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for point in data["points"]:
        series.setdefault((point["mode"], point["rng_replicas"]), []).append(point)
    most = max(p["workers"] for p in data["points"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for (mode, replicas), points, color in zip(
        series.keys(), series.values(), COLORS * 4, strict=False
    ):
        label = f"{mode}, {replicas} rng"
        xs = [x / 10 for x in range(0, most * 10 + 1)]
        model = [expected_rate(mode, x, replicas, costs) for x in xs]
        ax.plot(xs, model, "--", color=color, alpha=0.6, linewidth=1.5, label=f"{label}: model")
        points.sort(key=lambda p: p["workers"])
        ax.errorbar(
            [p["workers"] for p in points],
            [p["rate"] for p in points],
            yerr=[p["stderr"] for p in points],
            fmt="o-" if len(points) > 1 else "o",
            color=color,
            markersize=7,
            capsize=4,
            linewidth=1.2,
            label=f"{label}: measured",
        )
        for p in points:
            ax.annotate(
                f"{p['rate']:.1f}",
                (p["workers"], p["rate"]),
                textcoords="offset points",
                xytext=(6, -12),
                fontsize=8,
                color=color,
            )
    ax.set_xlabel("worker processes")
    ax.set_ylabel("hashes per second (least-squares slope of the Redis counter)")
    ax.set_xlim(0, most + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"DockerCoins scaling ({data['backend']}): rng read {costs.rng_read_cost} s, "
        f"hasher {costs.hasher_latency} s, think {costs.worker_think_time} s",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
