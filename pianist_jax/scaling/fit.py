"""Sweep results: run metrics, power laws with an irreducible term, the table and the plots.

    L(N) = E + A * N ** -alpha        (loss vs parameters, at the largest data budget)
    L(D) = E + B * D ** -beta         (loss vs tokens seen, for the largest model)

Why this form: it is the one of Kaplan et al. (2020) / Hoffmann et al. (2022); E is the loss
no amount of N (or D) removes. A sweep gives only 3-5 points per curve, so the fit is made
robust rather than clever:

- x is divided by its geometric mean before fitting (A then lives near the loss scale, not at
  1e12), and A is converted back afterwards;
- the exponent is first scanned on a grid, solving the linear least squares for (E, A) at each
  value with E clipped to [0, min(loss)) — a global start that `curve_fit` then refines
  within bounds (E in [0, min loss), A >= 0, exponent in [0, 4]);
- anything that cannot be fitted (fewer than 3 points, non-finite values) comes back as
  ``{"ok": false, "message": ...}`` instead of an exception, so a sweep always writes its
  table and plots.

No JAX here: only numpy, scipy and (for plots) matplotlib with the Agg backend.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_EXPONENT = 4.0
COLUMNS = (
    "name",
    "size",
    "budget",
    "status",
    "steps",
    "batch_size",
    "block_size",
    "tokens",
    "params",
    "params_non_embedding",
    "flops_per_token",
    "flops",
    "flops_6nd",
    "eval_loss",
    "eval_accuracy",
    "train_loss",
    "wall_s",
    "output_dir",
    "message",
)


def power_law(x, e: float, a: float, alpha: float):
    """E + A * x ** -alpha."""
    return e + a * np.power(np.asarray(x, dtype=float), -alpha)


def fit_power_law(x: Sequence[float], y: Sequence[float], *, min_points: int = 3) -> dict:
    """Fit y = E + A * x**-alpha; returns a JSON-able dict (see the module docstring).

    Keys: ok, message, E, A, alpha, n_points, rmse, x_min, x_max.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    out: dict = {
        "ok": False,
        "message": "",
        "E": None,
        "A": None,
        "alpha": None,
        "n_points": len(x),
        "rmse": None,
        "x_min": float(x.min()) if len(x) else None,
        "x_max": float(x.max()) if len(x) else None,
    }
    if len(x) != len(y):
        out["message"] = f"x and y differ in length ({len(x)} vs {len(y)})"
        return out
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < min_points:
        out["message"] = f"need >= {min_points} points with distinct x, got {len(np.unique(x))}"
        return out
    order = np.argsort(x)
    if not y[order[-1]] < y[order[0]]:
        out["message"] = "loss does not fall from the smallest to the largest x: no power law"
        return out
    scale = float(np.exp(np.mean(np.log(x))))
    xs = x / scale
    e_max = float(y.min()) * (1 - 1e-6)  # E strictly below every observed loss
    e0, a0, alpha0 = _grid_start(xs, y, e_max)
    try:
        from scipy.optimize import curve_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning on exactly-determined fits
            params, _ = curve_fit(
                power_law,
                xs,
                y,
                p0=[e0, a0, alpha0],
                bounds=([0.0, 0.0, 0.0], [max(e_max, 1e-12), np.inf, MAX_EXPONENT]),
                method="trf",
                maxfev=20000,
            )
        e, a, alpha = (float(p) for p in params)
        if _sse(xs, y, e, a, alpha) > _sse(xs, y, e0, a0, alpha0):
            e, a, alpha = e0, a0, alpha0  # curve_fit wandered off: keep the grid optimum
    except (RuntimeError, ValueError) as err:  # no convergence: the grid start still stands
        e, a, alpha = e0, a0, alpha0
        out["message"] = f"curve_fit failed ({err}); grid estimate reported"
    rmse = math.sqrt(_sse(xs, y, e, a, alpha) / len(x))
    out.update(
        ok=True,
        E=e,
        A=a * scale**alpha,
        alpha=alpha,
        rmse=rmse,
        n_points=len(x),
        x_min=float(x.min()),
        x_max=float(x.max()),
    )
    notes = []
    if alpha >= MAX_EXPONENT * 0.999 or alpha <= 1e-6:
        notes.append(f"exponent at its bound ({alpha:.3g})")
    if e <= 1e-9:
        notes.append(
            "E at its lower bound 0: the loss falls faster than a power law with an "
            "irreducible term allows (too few points, or not yet in the power-law regime)"
        )
    elif e >= e_max * 0.999:
        notes.append("E at its upper bound (the smallest loss)")
    if len(x) == 3 and rmse < 1e-6 * float(np.ptp(y) or 1.0):
        notes.append("3 points for 3 parameters: an exact fit, no residual check")
    out["message"] = "; ".join(filter(None, [out["message"], *notes]))
    return out


def _sse(x, y, e, a, alpha) -> float:
    return float(np.sum((power_law(x, e, a, alpha) - y) ** 2))


def _grid_start(x: np.ndarray, y: np.ndarray, e_max: float) -> tuple[float, float, float]:
    """Best (E, A, alpha) over an exponent grid, (E, A) by least squares with E in [0, e_max]."""
    best = (float("inf"), 0.0, float(np.mean(y)), 0.0)
    for alpha in np.linspace(0.01, MAX_EXPONENT, 400):
        f = np.power(x, -alpha)
        design = np.stack([np.ones_like(f), f], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if not (0.0 <= e <= e_max) or a < 0:  # clip E, refit A alone (A >= 0)
            e = float(np.clip(e, 0.0, e_max))
            a = max(float(np.dot(f, y - e) / np.dot(f, f)), 0.0)
        sse = _sse(x, y, e, a, alpha)
        if sse < best[0]:
            best = (sse, float(e), float(a), float(alpha))
    return best[1], best[2], best[3]


# --------------------------------------------------------------------------- plots


def plot_scaling(
    rows: list[dict], fits: dict, out_dir: str | Path, *, params_key: str = "params_non_embedding"
) -> list[Path]:
    """``loss_vs_params.png`` (one line per budget, L(N) fit) and ``loss_vs_tokens.png`` (one
    line per size, L(D) fit), log-log. ``rows`` are finished points (size, budget, tokens,
    eval_loss, the params column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = "non-embedding parameters" if params_key == "params_non_embedding" else "parameters"
    written = []
    for name, xkey, group, other, fit_key, xlabel in (
        ("loss_vs_params.png", params_key, "budget", "size", "L_N", label),
        ("loss_vs_tokens.png", "tokens", "size", "budget", "L_D", "tokens seen"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        groups: dict = {}
        for row in rows:
            groups.setdefault(row[group], []).append(row)
        colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(groups), 1)))
        for color, (key, members) in zip(colors, groups.items()):
            members = sorted(members, key=lambda r: r[xkey])
            text = f"budget {key:g}" if group == "budget" else f"size {key}"
            ax.plot(
                [r[xkey] for r in members],
                [r["eval_loss"] for r in members],
                "o-",
                color=color,
                label=text,
            )
        fit = fits.get(fit_key) or {}
        if fit.get("ok"):
            xs = np.geomspace(fit["x_min"] / 1.5, fit["x_max"] * 1.5, 100)
            symbol = "N" if fit_key == "L_N" else "D"
            e = fit["E"] if fit["E"] > 1e-9 else 0.0
            ax.plot(
                xs,
                power_law(xs, fit["E"], fit["A"], fit["alpha"]),
                "--",
                color="crimson",
                label=f"fit: {e:.3g} + {fit['A']:.3g}·{symbol}^-{fit['alpha']:.3g}"
                f" ({fit.get('over', '')})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())  # losses as plain numbers
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final validation loss")
        ax.set_title(f"loss vs {xlabel}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- run metrics


def parse_metrics(text: str) -> list[dict]:
    """Records of a trainer's ``metrics.jsonl`` (`pianist_jax.train.loop.MetricsLog`) with step,
    split and loss; a torn line (a run killed mid-write, or still writing) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and {"step", "split", "loss"} <= rec.keys():
            out.append(rec)
    return out


def last_step(path: Path) -> tuple[int, float]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="ignore")
    except OSError:
        return 0, float("nan")
    train = [m for m in parse_metrics(tail) if m["split"] == "train"]
    return (int(train[-1]["step"]), float(train[-1]["loss"])) if train else (0, float("nan"))


def read_final(run_dir: str | Path, steps: int) -> dict | None:
    """From a run's metrics.jsonl: the eval loss/accuracy at `steps` and the mean train loss of
    the last 10% of steps; None unless the run reached `steps` and evaluated there."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = parse_metrics(path.read_text())
    evals = [m for m in lines if m["split"] == "eval" and m["step"] == steps]
    tail = [
        m["loss"]
        for m in lines
        if m["split"] == "train" and m["step"] > steps - max(1, steps // 10)
    ]
    if not evals or not any(m["split"] == "train" and m["step"] == steps for m in lines):
        return None
    return {
        "eval_loss": evals[-1]["loss"],
        "eval_accuracy": evals[-1].get("accuracy"),
        "train_loss": sum(tail) / len(tail),
    }


# --------------------------------------------------------------------------- sweep report


def fit_rows(rows: list[dict], params_key: str) -> dict:
    """L(N) over the largest budget's points, L(D) over the largest model's points, and whether
    loss falls with size (per budget) and with data (per size)."""
    ok = [r for r in rows if r["status"] == "ok" and r["eval_loss"] is not None]
    fits: dict = {"params_key": params_key, "n_ok": len(ok), "n_points": len(rows)}
    if not ok:
        fits["L_N"] = fits["L_D"] = {"ok": False, "message": "no finished points"}
        return fits
    budget = max(r["budget"] for r in ok)
    by_n = sorted((r for r in ok if r["budget"] == budget), key=lambda r: r[params_key])
    fits["L_N"] = {
        **fit_power_law([r[params_key] for r in by_n], [r["eval_loss"] for r in by_n]),
        "over": f"budget {budget:g}",
        "points": [r["name"] for r in by_n],
    }
    biggest = max(ok, key=lambda r: r[params_key])["size"]
    by_d = sorted((r for r in ok if r["size"] == biggest), key=lambda r: r["tokens"])
    fits["L_D"] = {
        **fit_power_law([r["tokens"] for r in by_d], [r["eval_loss"] for r in by_d]),
        "over": f"size {biggest}",
        "points": [r["name"] for r in by_d],
    }
    fits["L_D"]["beta"] = fits["L_D"].pop("alpha")  # L(D) = E + B * D^-beta
    fits["L_D"]["B"] = fits["L_D"].pop("A")

    def falls(groups: dict) -> dict:
        return {
            str(k): all(a["eval_loss"] > b["eval_loss"] for a, b in itertools.pairwise(v))
            for k, v in groups.items()
            if len(v) > 1
        }

    per_budget: dict = {}
    per_size: dict = {}
    for r in sorted(ok, key=lambda r: r[params_key]):
        per_budget.setdefault(f"{r['budget']:g}", []).append(r)
    for r in sorted(ok, key=lambda r: r["tokens"]):
        per_size.setdefault(r["size"], []).append(r)
    fits["loss_falls_with_size"] = falls(per_budget)
    fits["loss_falls_with_data"] = falls(per_size)
    return fits


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    *,
    name: str,
    params: str = "non_embedding",
    budget_unit: str = "corpus",
    out: typing.TextIO | None = None,
) -> dict:
    """results.csv/json, fit.json, the two plots and summary.md in out_dir; returns the fits.
    ``params`` ("non_embedding" or "total") picks the N of L(N); ``budget_unit`` ("corpus" or
    "flops") says what the budgets count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(out_dir / "results.json", rows)
    params_key = "params_non_embedding" if params == "non_embedding" else "params"
    fits = fit_rows(rows, params_key)
    write_json(out_dir / "fit.json", fits)
    ok = [r for r in rows if r["status"] == "ok"]
    plot_fits = {
        "L_N": fits["L_N"],
        "L_D": dict(fits["L_D"], A=fits["L_D"].get("B"), alpha=fits["L_D"].get("beta")),
    }
    if ok:
        plot_scaling(ok, plot_fits, out_dir, params_key=params_key)
    summary = summary_table(rows, name, params_key, fits, budget_unit)
    (out_dir / "summary.md").write_text(summary)
    if out is not None:
        out.write(summary)
    return fits


def summary_table(
    rows: list[dict], name: str, params_key: str, fits: dict, budget_unit: str = "corpus"
) -> str:
    """Markdown: the loss grid (sizes x budgets), the best size per budget (at a FLOP budget:
    the compute-optimal size among those tried) and the fitted laws."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    cell = {(r["size"], r["budget"]): r for r in rows}
    lines = [
        (
            f"## sweep {name}: final validation loss (rows: size, columns: budget = "
            + ("training FLOPs" if budget_unit == "flops" else "fraction of the corpus")
            + "; tokens seen in brackets)"
        ),
        "",
        "| size | "
        + ("non-emb. " if params_key != "params" else "")
        + "params | "
        + " | ".join(f"{b:g}" for b in budgets)
        + " |",
        "|---|---:|" + "---:|" * len(budgets),
    ]
    for size in sizes:
        first = next(r for r in rows if r["size"] == size)
        vals = []
        for b in budgets:
            r = cell.get((size, b))
            loss = (
                f"{r['eval_loss']:.4f}"
                if r and r["eval_loss"] is not None
                else (r or {}).get("status", "-")
            )
            vals.append(f"{loss} ({r['tokens'] / 1e6:.3g}M)" if r else "-")
        lines.append(f"| {size} | {first[params_key]:,} | " + " | ".join(vals) + " |")
    lines.append("")
    for b in budgets:
        done = [r for r in rows if r["budget"] == b and r.get("eval_loss") is not None]
        if done:
            best = min(done, key=lambda r: r["eval_loss"])
            lines.append(f"- lowest loss at budget {b:g}: {best['size']} ({best['eval_loss']:.4f})")
    for key, sym, exp, coef in (("L_N", "N", "alpha", "A"), ("L_D", "D", "beta", "B")):
        f = fits.get(key, {})
        if f.get("ok"):
            lines.append(
                f"- {key}: {f['E']:.4g} + {f[coef]:.4g} * {sym}^-{f[exp]:.4g} over "
                f"{f['over']} ({f['n_points']} points, rmse {f['rmse']:.3g}) "
                f"{f.get('message', '')}".rstrip()
            )
        else:
            lines.append(f"- {key}: not fitted: {f.get('message')}")
    for key in ("loss_falls_with_size", "loss_falls_with_data"):
        lines.append(f"- {key.replace('_', ' ')}: {fits.get(key, {})}")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj) -> None:
    """Write atomically: a result file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
