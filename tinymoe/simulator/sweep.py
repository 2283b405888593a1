"""A simulate sweep's output: one table (or JSON) of every point, and a plot of it.

`tinymoe simulate --sweep AXIS=V1,V2 ...` runs one simulation per point of the product of the
axes (simulate.py); these put the points' rows together, with the swept values as columns.
"""

from tinymoe.errors import TinyMoeError
from tinymoe.plot import pyplot


def sweep_result(sweep: dict[str, list], results: list[tuple[dict, dict]]) -> dict:
    """One result for a sweep: each point's settings, and its rows with the swept values."""
    keep = ("where", "link_gbps", "prefetch_depth", "decode_steps")
    return {
        "sweep": sweep,
        "model": results[0][1]["model"],
        "points": [{**at, **{k: r[k] for k in keep}} for at, r in results],
        "rows": [{**at, **row} for at, r in results for row in r["rows"]],
    }


def format_sweep(result: dict) -> str:
    """The sweep's table: the swept values, then per policy and handler what a point's has."""
    axes = list(result["sweep"])
    lines = [f"sweep over {', '.join(axes)}: {len(result['points'])} points"]
    lines += [
        f"  {', '.join(f'{a} {p[a]}' for a in axes)}: {p['where']}, link {p['link_gbps']:.3f} "
        f"GB/s, exact prefetch depth {p['prefetch_depth']}"
        for p in result["points"]
    ]
    head = "".join(f"{a:>13} " for a in axes)
    lines.append(
        f"{head}{'policy':<24} {'misses':>6} {'slots':>5} {'sim TPOT':>9} {'hit':>5} "
        f"{'GB/step':>8} {'stall ms':>8}"
    )
    for r in result["rows"]:
        gb = r["bytes_copied"] / max(r["steps"], 1) / 1e9
        lines.append(
            "".join(f"{r[a]!s:>13} " for a in axes)
            + f"{r['policy']:<24} {r['miss_handler']:>6} {r['expert_slots']:>5} "
            f"{r['simulated_tpot_ms']:9.2f} {r['hit_rate']:5.2f} {gb:8.4f} {r['stall_ms']:8.2f}"
        )
    return "\n".join(lines)


def plot_sweep(result: dict, path: str) -> None:
    """Simulated TPOT against the first swept axis: a line per policy (and handler, and value
    of every other axis)."""
    plt = pyplot()
    first, *others = result["sweep"]
    xs = result["sweep"][first]
    lines: dict[str, dict] = {}
    for r in result["rows"]:
        label = " ".join(
            [r["policy"], *([r["miss_handler"]] if r["miss_handler"] != "copy" else [])]
        )
        label += "".join(f", {a} {r[a]}" for a in others)
        lines.setdefault(label, {})[r[first]] = r["simulated_tpot_ms"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in lines.items():
        at = [x for x in xs if x in ys]
        ax.plot([xs.index(x) for x in at], [ys[x] for x in at], marker="o", label=label)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set(xlabel=first, ylabel="simulated TPOT (ms)", title=f"{result['model'].get('model_type')}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise TinyMoeError(f"--plot {path}: cannot write ({e})") from None
    finally:
        plt.close(fig)
