"""The recipe's report: perplexity table (markdown, CSV, JSON) and plots (PNG, also in TensorBoard).

The report and work directories may be URLs (``gs://...``, see :mod:`btx_jax.paths`)."""
from __future__ import annotations

import csv
import io
import json
import re

import numpy as np

from btx_jax import paths
from btx_jax.metrics import read_metrics


def _cell(value: float, interval, bold: bool) -> str:
    half = (interval[1] - interval[0]) / 2
    text = f"{value:.3f} ±{half:.3f}"
    return f"**{text}**" if bold else text


def _drop(row: dict) -> str:
    drop = row.get("drop")
    if not drop:
        return "-"
    fmt = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    return f"{fmt(drop['train'])} / {fmt(drop['eval'])}"


def _table(results: dict) -> tuple[list[str], list[list[str]]]:
    domains, train_domains, best = results["domains"], results["train_domains"], results["best"]
    header = ["model", *domains, f"avg ({len(train_domains)} train domains)", "dropped (train / eval)",
              "train FLOPs", "train tokens"]
    rows = []
    for r in results["models"]:
        cells = [r["model"]]
        cells += [_cell(r["ppl"][d], r["interval"][d], best.get(d) == r["model"]) for d in domains]
        cells.append(_cell(r["avg_ppl"], r["avg_interval"], best.get("avg") == r["model"]))
        cells += [_drop(r), f"{r['flops']:.3g}", f"{r['tokens']:,}"]
        rows.append(cells)
    return header, rows


def _out_of_domain(extra: list[str], results: dict) -> str:
    """The held-out-only domains; the recipe's extend stages train an expert on one of them."""
    extended = [r["model"] for r in results["models"] if r["model"].startswith("BTX + ")]
    but = f"; except the rows {', '.join(extended)}, whose added expert was trained on it" if extended else ""
    return f"Out-of-domain (no other stage trains on it{but}): {', '.join(extra)}. "


def markdown(results: dict) -> str:
    header, rows = _table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    extra = [d for d in results["domains"] if d not in results["train_domains"]]
    scored = ", ".join(f"{d} {results['tokens_scored'][d]:,} tokens in {results['documents'][d]:,} documents"
                       for d in results["domains"])
    trials = results["trials"]
    note = (f"\nHeld-out perplexity per domain (lower is better), the mean over {trials} training "
            f"seed{'s' if trials > 1 else ''} ± half the width of a 95% paired-bootstrap interval over eval documents"
            f"{' and seeds' if trials > 1 else ''} ({results['bootstrap']} replicates). Bold: the model that beats every "
            "other one in at least 97.5% of the replicates; a column without bold has no clear winner. "
            f"Scored: {scored}. "
            f"{_out_of_domain(extra, results) if extra else ''}"
            "Compute: training FLOPs of every stage the model needed (6 x active params x tokens + attention); "
            "the dense and upcycling baselines were given BTX's compute after the seed; BTM uses the seed and "
            "branches only (no finetuning). MoE models are evaluated without capacity (dropless); 'dropped' is the "
            "fraction of routing choices the capacity dropped in training and in this evaluation. The BTM ensemble's "
            "prior is an EMA over the evaluation's earlier documents (as in BTM); the posterior-average weights are "
            f"fitted on {results['calibration_tokens']:,} tokens of each domain's training split. Sample-level "
            "routing sends each document to the one branch expert with the highest domain posterior so far.\n")
    return "\n".join(lines) + "\n" + note


def opt_out_markdown(results: dict) -> str:
    """The "Opting out one expert" table (FlexOlmo's opt-out): BTX with one expert masked, per domain, as
    perplexity (change against the full BTX [its paired 95% interval]); "" without ``results["opt_out"]``."""
    opt_out = results.get("opt_out")
    if not opt_out:
        return ""
    domains = results["domains"]
    full = next(r for r in results["models"] if r["model"] == "BTX")
    lines = ["## Opting out one expert", "", "| removed expert | " + " | ".join(domains) + " |",
             "|" + "---|" * (len(domains) + 1),
             "| none (BTX) | " + " | ".join(f"{full['ppl'][d]:.3f}" for d in domains) + " |"]
    for label, cells in opt_out.items():
        texts = []
        for d in domains:
            c = cells[d]
            low, high = c["interval"]
            text = f"{c['ppl']:.3f} ({c['delta']:+.3f} [{low:+.3f}, {high:+.3f}])"
            texts.append(f"**{text}**" if low > 0 or high < 0 else text)
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    note = ("\nBTX evaluated with one expert masked (moe.masked_experts: never routed to, the other experts' router "
            "probabilities renormalised; the checkpoint is unchanged), on the same documents as the full BTX: "
            "perplexity (its change against the full BTX [95% paired-bootstrap interval of the change]). Rows are "
            "named by what the expert was trained on (the seed: the seed's own FFN). Bold: the interval excludes 0. "
            "A positive change is what that expert was worth on the domain.\n")
    return "\n" + "\n".join(lines) + "\n" + note


def _png(fig, path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    path.write_bytes(buffer.getvalue())


def _save(fig, path, images: dict):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    _png(fig, path)
    fig.canvas.draw()
    images[path.stem] = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)


def plots(report_dir, results: dict, workdir) -> dict:
    """PNG files; returns {name: RGB array} for TensorBoard."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, report_dir, workdir = {}, paths.resolve(report_dir), paths.resolve(workdir)
    # loss curves of every training stage
    stages = [s for s, r in results["stages"].items() if r.get("steps")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage in stages:
        if (workdir / stage / "metrics.jsonl").exists():
            curve = [(m["step"], m["loss"]) for m in read_metrics(workdir / stage) if "loss" in m]
            ax.plot(*zip(*curve), label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    if ax.get_lines():
        ax.legend(fontsize=7)
    ax.set_title("loss per stage")
    _save(fig, report_dir / "loss_curves.png", images)

    # routing: domain x expert per MoE layer, for BTX (routing.png) and every other MoE model (routing_<model>.png)
    by_model = results.get("routing_by_model") or ({"BTX": results["routing"]} if results.get("routing") else {})
    for name, routing in by_model.items():
        slug = "routing" if name == "BTX" else "routing_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        _routing_figure(plt, routing, f"{name} routing: domain x expert", report_dir / f"{slug}.png", images, slug)
    if results.get("routing"):
        usage = np.array(list(results["routing"].values()))  # [domains, L, E]
        layers, experts = usage.shape[1], usage.shape[2]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        overall = usage.mean(axis=0)  # [L, E]
        width = 0.8 / layers
        for layer in range(layers):
            ax.bar(np.arange(experts) + layer * width, overall[layer], width, label=f"layer {layer}")
        ax.axhline(1.0 / experts, color="gray", linestyle="--", linewidth=1, label="uniform")
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction of routed tokens")
        ax.legend(fontsize=7)
        ax.set_title("BTX expert usage (all eval domains)")
        _save(fig, report_dir / "expert_usage.png", images)

    # perplexity vs compute
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results["models"]:
        low, high = r["avg_interval"]
        ax.errorbar(r["flops"] / 1e15, r["avg_ppl"], yerr=[[r["avg_ppl"] - low], [high - r["avg_ppl"]]], fmt="o",
                    capsize=3)
        ax.annotate(r["model"], (r["flops"] / 1e15, r["avg_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training compute (PFLOP)")
    ax.set_ylabel("average held-out perplexity (train domains)")
    ax.set_title("perplexity vs compute")
    _save(fig, report_dir / "ppl_vs_compute.png", images)
    return images


def write(report_dir, results: dict, workdir, out=print) -> None:
    report_dir = paths.resolve(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.json").write_text(json.dumps(results, indent=1))
    header, rows = _table(results)
    csv_text = io.StringIO(newline="")
    writer = csv.writer(csv_text)
    writer.writerow(header)
    writer.writerows([[c.strip("*") for c in row] for row in rows])
    (report_dir / "results.csv").write_bytes(csv_text.getvalue().encode())
    table = markdown(results) + opt_out_markdown(results)
    (report_dir / "results.md").write_text("# BTX results\n\n" + table)
    images = plots(report_dir, results, workdir)
    from tensorboardX import SummaryWriter
    tb = SummaryWriter(str(report_dir / "tensorboard"))
    tb.add_text("results", table)
    for name, image in images.items():
        tb.add_image(f"report/{name}", image, 0, dataformats="HWC")
    tb.close()
    out(f"[recipe] report: {report_dir}\n" + table)


def write_sweep(report_dir, sweep: dict, models, out=print) -> None:
    """The sweep's table (markdown) and sweep.png: average and per-domain perplexity against the swept value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knob, points = sweep["knob"], sweep["points"]
    domains = points[0]["results"]["domains"]
    columns = ["avg", *domains]
    lines = [f"| {knob} | steps (seed / branch / finetune) | model | " + " | ".join(columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    series = {m: {c: [] for c in columns} for m in models}
    for p in points:
        rows = {r["model"]: r for r in p["results"]["models"]}
        steps, best = p["steps"], p["results"]["best"]
        for m in models:
            if m not in rows:
                continue
            r = rows[m]
            values = {"avg": (r["avg_ppl"], r["avg_interval"]), **{d: (r["ppl"][d], r["interval"][d]) for d in domains}}
            cells = [_cell(v, i, best.get(c) == m) for c, (v, i) in values.items()]
            lines.append(f"| {p['value']:g} | {steps['seed_steps']} / {steps['branch_steps']} / "
                         f"{steps['finetune_steps']} | {m} | " + " | ".join(cells) + " |")
            for c, (v, i) in values.items():
                series[m][c].append((p["value"], v, i[0], i[1]))
    table = "\n".join(lines) + ("\n\nPerplexity ± half the 95% paired-bootstrap interval at each point of the sweep; "
                                "the total training budget is the same at every point; bold: the clear winner of the "
                                "column among all models of that point (see each point's report).\n")
    report_dir = paths.resolve(report_dir)
    (report_dir / "sweep.md").write_text(f"# BTX sweep over {knob}\n\n" + table)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.6 * len(columns), 3.6), squeeze=False)
    for ax, c in zip(axes[0], columns):
        for m in models:
            if not series[m][c]:
                continue
            x, y, low, high = map(np.array, zip(*series[m][c]))
            ax.errorbar(x, y, yerr=[y - low, high - y], marker="o", capsize=3, label=m)
        ax.set_title("average (train domains)" if c == "avg" else c, fontsize=10)
        ax.set_xlabel(knob.replace("_", " "))
    axes[0][0].set_ylabel("held-out perplexity")
    axes[0][0].legend(fontsize=7)
    _save(fig, report_dir / "sweep.png", {})
    out(f"[recipe] sweep report: {report_dir}/sweep.md, sweep.png\n" + table)


def _routing_figure(plt, routing: dict, title: str, path, images: dict, key: str) -> None:
    """One heatmap per MoE layer of the fraction of each domain's routing choices that go to each expert."""
    domains = list(routing)
    usage = np.array([routing[d] for d in domains])  # [domains, L, E]
    layers, experts = usage.shape[1], usage.shape[2]
    fig, axes = plt.subplots(1, layers, figsize=(2.5 + 2.2 * layers * max(experts, 4) / 4, 1.6 + 0.45 * len(domains)),
                             squeeze=False, layout="constrained")
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(usage[:, layer], cmap="viridis", vmin=0, vmax=max(usage.max(), 1e-6), aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if layer == 0 else [], fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="fraction routed")
    fig.suptitle(title, fontsize=10)
    _png(fig, path)
    fig.canvas.draw()
    images[key] = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
