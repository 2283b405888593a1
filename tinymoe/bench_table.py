"""`tinymoe bench`'s table: a row per policy (and --expert-quant), from bench.main's result."""

from tinymoe.offload.policy import parse_policy


def format_table(result: dict) -> str:
    w = max([24] + [len(_label(r)) for r in result["rows"]])  # the policy column's width
    head = (
        f"{'policy':<{w}} {'slots':>5} {'TPOT ms':>8} {'vs OD':>6} {'tok/s':>7} {'hit':>5} "
        f"{'GB copied':>9} {'stall':>6} {'copy':>6} {'GB/s':>7} {'Eq.1 ms':>8} {'of Eq.1':>7} exact"
    )
    warm = result.get("warm") and result["rows"][0]["over_resident_us_per_layer"] is not None
    if warm:
        head += f" {'host us/L':>9}"
    # Fail-safe speculation (a predictor that reports its confidence): the share of guesses that
    # fell back to exact routing, each one a layer that waited for its copies as on-demand does.
    fallbacks = any(r.get("fallback_share") is not None for r in result["rows"])
    if fallbacks:
        head += f" {'fell back':>9}"
    if result["link_gbps"] is None:
        link = f"CUDA, pinned host-to-device peak {result['h2d_peak_gbps']:.1f} GB/s"
    else:
        link = f"link {result['link_gbps']:.3f} GB/s + {result['link_latency_us']} us"
    lines = [
        f"{result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, {link}, "
        f"exact prefetch depth {result['prefetch_depth']}, {result['threads']} threads"
        + (", warm (each run generated the prompt once first)" if result.get("warm") else ""),
        head,
    ]
    for r in result["rows"]:
        # Eq. 1 bounds what overlap can save; rows that avoid copies (caches) are not bounded by it.
        prefetches = parse_policy(r["policy"]).predictor is not None
        share = r["eq1_saving_share"]
        eq1_share = f"{share:.1%}" if prefetches and share is not None else "-"
        lines.append(
            f"{_label(r):<{w}} {r['expert_slots']:>5} {r['tpot_ms']:>8.2f} "
            f"{r['ratio_vs_on_demand']:>6.3f} {r['tokens_per_s']:>7.1f} {r['hit_rate']:>5.2f} "
            f"{r['gb_copied']:>9.4f} {r['stall_share']:>6.1%} {r['copy_share']:>6.1%} "
            f"{r['achieved_gbps'] or 0:>7.2f} "
            f"{r['eq1_bound_ms']:>8.2f} {eq1_share:>7} {r['exact']!s:<5}"
            + (f" {r['over_resident_us_per_layer']:>9.1f}" if warm else "")
            + (f" {_share(r.get('fallback_share')):>9}" if fallbacks else "")
        )
    return "\n".join(lines)


def _label(row: dict) -> str:
    """The row's policy, with its experts' format when quantized ("on-demand int4")."""
    quant = row.get("expert_quant", "none")
    return row["policy"] if quant == "none" else f"{row['policy']} {quant}"


def _share(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"
