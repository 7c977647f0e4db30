"""The study's table (study.md, study.csv, study.json) and its plot (study.png)."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.engine.folders import OutputError, write_text
from utils.study.plan import Variant
from utils.study.stats import METRICS, Delta, mean_sd

LABELS = {"map50": "mAP50", "map50_95": "mAP50-95"}


@dataclass
class VariantResult:
    """Everything measured of one variant: per-seed test mAPs and seconds, failures, cost, latency, deltas."""

    variant: Variant
    per_seed: dict[int, dict] = field(default_factory=dict)   # seed -> {"map50", "map50_95", "seconds"}
    failed: dict[int, str] = field(default_factory=dict)      # seed -> one-line error
    cost: dict | None = None
    latency: dict | None = None
    delta: dict[str, Delta] | None = None


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def row(result: VariantResult) -> dict:
    """One flat row of the table (NaN where not measured)."""
    out: dict = {"variant": result.variant.name, "flags": " ".join(result.variant.flags),
                 "seeds_done": len(result.per_seed), "seeds_failed": len(result.failed)}
    for metric in METRICS:
        out[f"{metric}_mean"], out[f"{metric}_sd"] = mean_sd([r[metric] for r in result.per_seed.values()])
    for metric in METRICS:
        d = result.delta.get(metric) if result.delta else None
        out[f"delta_{metric}"] = d.value if d else math.nan
        out[f"delta_{metric}_low"] = d.low if d else math.nan
        out[f"delta_{metric}_high"] = d.high if d else math.nan
        out[f"within_noise_{metric}"] = d.within_noise if d else None
    cost = result.cost or {}
    for key in ("parameters", "gflops", "gflops_matmul", "attention_gflops"):
        out[key] = cost.get(key, math.nan)
    lat = result.latency or {}
    out["latency_ms"], out["latency_e2e_ms"] = lat.get("model_ms", math.nan), lat.get("e2e_ms", math.nan)
    out["train_seconds_mean"] = mean_sd([r["seconds"] for r in result.per_seed.values()])[0]
    return out


def _delta_text(r: dict, metric: str, baseline: bool) -> str:
    if baseline:
        return "baseline"
    if not math.isfinite(r[f"delta_{metric}"]):
        return "-"
    noise = " (within noise)" if r[f"within_noise_{metric}"] else ""
    return (f"{r[f'delta_{metric}']:+.4f} [{r[f'delta_{metric}_low']:+.4f}, {r[f'delta_{metric}_high']:+.4f}]"
            f"{noise}")


def markdown(rows: list[dict], baseline: str, header: dict, failures: list[tuple[str, str]]) -> str:
    """study.md: the settings, the table, what the interval means, and every failed run with its error."""
    lines = [f"# Study {header['study']}", "",
             f"Test split `{header['test_split']}` ({header['test_images']} images); best.pt chosen on "
             f"{header['validation']}. Seeds {', '.join(map(str, header['seeds']))}. Train flags: "
             f"`{' '.join(header['train_flags']) or '(defaults)'}`.", "",
             "| variant | seeds | mAP50 | mAP50-95 | delta mAP50 [95% CI] | delta mAP50-95 [95% CI] | parameters | "
             "GFLOPs (of which attention) | GFLOPs conv/matmul only | latency ms | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = f"{r['seeds_done']}" + (f" ({r['seeds_failed']} failed)" if r["seeds_failed"] else "")
        params = "-" if not math.isfinite(r["parameters"]) else f"{int(r['parameters']):,}"
        gflops = "-" if not math.isfinite(r["gflops"]) else f"{r['gflops']:.3f} ({r['attention_gflops']:.4f})"
        lines.append(" | ".join([
            f"| {r['variant']}", seeds,
            f"{_num(r['map50_mean'])} +- {_num(r['map50_sd'])}", f"{_num(r['map50_95_mean'])} +- {_num(r['map50_95_sd'])}",
            _delta_text(r, "map50", r["variant"] == baseline), _delta_text(r, "map50_95", r["variant"] == baseline),
            params, gflops, _num(r["gflops_matmul"], 3), _num(r["latency_ms"], 3),
            _num(r["train_seconds_mean"], 1)]) + " |")
    lines += ["", f"Means +- sample sd over seeds. Deltas: variant minus `{baseline}`, averaged over the seeds both "
              f"have; the interval is the {header['level'] * 100:g}% percentile interval of a paired bootstrap over "
              f"test images ({header['resamples']} resamples, the same images and seeds for both), so it covers "
              "test-set sampling with the trained models fixed. *within noise*: the interval covers 0.",
              f"Latency: batch 1 through yolo.YOLO on {header['latency_device']} ({header['latency_precision']}), "
              "model forward alone (end to end in study.csv). GFLOPs count every op (pooling, gates, "
              "sigmoid/softmax, normalisation too) for one image; the conv/matmul-only column is what "
              "torch.utils.flop_counter alone reports. Train s: wall time of the training process per run "
              f"({header['concurrency']})."]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- `{key}`: {error}" for key, error in failures]
    return "\n".join(lines) + "\n"


def write_tables(folder: Path, rows: list[dict], baseline: str, header: dict,
                 failures: list[tuple[str, str]], per_run: list[dict]) -> str:
    """Write study.md, study.csv and study.json; returns the markdown."""
    text = markdown(rows, baseline, header, failures)
    write_text(folder / "study.md", text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(folder / "study.csv", buffer.getvalue())
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    write_text(folder / "study.json", json.dumps({**header, "baseline": baseline, "variants": clean, "runs": per_run,
                                                  "failed": [{"run": k, "error": e} for k, e in failures]}, indent=1))
    return text


def plot(folder: Path, rows: list[dict], baseline: str) -> Path:
    """study.png: deltas to the baseline with their intervals, and mAP50-95 against latency."""
    import matplotlib  # noqa: PLC0415  (only the study draws)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax_delta, ax_speed) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 3))
    others = [r for r in rows if r["variant"] != baseline]
    for k, metric in enumerate(METRICS):
        ys = [i + 0.15 * (1 - 2 * k) for i in range(len(others))]
        xs = [r[f"delta_{metric}"] for r in others]
        err = [[max(0.0, r[f"delta_{metric}"] - r[f"delta_{metric}_low"]) for r in others],
               [max(0.0, r[f"delta_{metric}_high"] - r[f"delta_{metric}"]) for r in others]]
        ax_delta.errorbar(xs, ys, xerr=err, fmt="o", capsize=3, label=LABELS[metric])
    ax_delta.axvline(0, color="grey", lw=1)
    ax_delta.set_yticks(range(len(others)), [r["variant"] for r in others])
    ax_delta.invert_yaxis()
    ax_delta.set_xlabel(f"delta to {baseline} (95% paired bootstrap interval)")
    ax_delta.legend()
    for r in rows:
        ax_speed.errorbar(r["latency_ms"], r["map50_95_mean"], yerr=0 if not math.isfinite(r["map50_95_sd"])
                          else r["map50_95_sd"], fmt="o", capsize=3)
        ax_speed.annotate(r["variant"], (r["latency_ms"], r["map50_95_mean"]), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
    ax_speed.set_xlabel("latency, batch 1 (ms)")
    ax_speed.set_ylabel("test mAP50-95 (mean +- sd over seeds)")
    fig.tight_layout()
    path = folder / "study.png"
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise OutputError(path, exc.strerror or str(exc)) from exc
    finally:
        plt.close(fig)
    return path
