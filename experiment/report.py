"""The comparison written out: markdown tables of one run, of seeds pooled and of the length sweep, and the
pictures (samples side by side, the guidance trade-off, loss curves, the length curve).
"""
import json
import os


import perceptual_diffusion
from perceptual_diffusion import generate, to_uint8
from .stats import HELPS_RULE, LENGTH_METRICS, METRIC_KEYS, PRDC, PRIMARY, SWEEP_KEYS, VERDICT_METRICS


def fmt_ci(ci):
    """[lo, hi] as text."""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


GREY = (128, 128, 128)   # the gaps between pictured samples: neither a dark nor a light background


def tile(x, scale, gap=2, group=0, group_gap=8):
    """Images x (r, c, 3, S, S) uint8 as one PIL image: each scaled `scale` times, `gap` grey pixels around
    every cell and `group_gap` more after every `group` columns, so that neighbouring samples never run into
    each other whatever the data's background. Returns (image, cell pitch, group pitch)."""
    from PIL import Image
    r, c, _, S, _ = x.shape
    pitch = S * scale + gap
    groups = c // group if group else 1
    canvas = Image.new("RGB", (gap + c * pitch + (groups - 1) * group_gap, gap + r * pitch), GREY)
    for i in range(r):
        for j in range(c):
            cell = Image.fromarray(x[i, j].permute(1, 2, 0).numpy()).resize((S * scale, S * scale), Image.NEAREST)
            canvas.paste(cell, (gap + j * pitch + (j // group if group else 0) * group_gap, gap + i * pitch))
    return canvas, pitch, (group * pitch + group_gap if group else 0)


def comparison_picture(models, schedule, rows, guidance, path, per_class, steps, precision, class_names=()):
    """One labelled column per conditional row, one line per class (named on the left), the same classes and the
    same initial noise in every column: read across a line to compare the rows on one class and one x_T.
    guidance: {row: (w, phi)} of the guided rows."""
    from PIL import Image, ImageDraw
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    scale, pad, head = max(2, 64 // models["mse"].image_size), 8, 30
    left = max([70] + [int(measure(c)) + 12 for c in class_names])           # every class named in full
    columns = []
    for row, name, key, mode in rows:
        m = models[key]
        k, s = max(m.num_classes, 1), m.image_size
        w, phi = guidance.get(row, (1.0, 0.0))
        x, _ = generate(m, schedule, per_class * k, steps, w, phi, seed=12345, precision=precision)
        # sample i has class i % k: one class per line, per_class samples side by side
        col, pitch, _ = tile(to_uint8(x).view(per_class, k, 3, s, s).transpose(0, 1), scale)
        columns.append((f"{row}. {name}\n" + (f"w={w:g}, phi={phi:g}" if row in guidance else "no guidance"), col))
    width = max(160, columns[0][1].width)
    canvas = Image.new("RGB", (left + len(columns) * (width + pad) + pad, columns[0][1].height + head + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(class_names):
        draw.text((4, head + j * pitch + pitch // 2 - 5), c, fill="black")
    for i, (title, col) in enumerate(columns):
        x0 = left + pad + i * (width + pad)
        draw.multiline_text((x0, 3), title, fill="black")
        canvas.paste(col, (x0 + (width - col.width) // 2, head))
    canvas.save(path)


def tradeoff_picture(res, path):
    """The guidance trade-off (guidance_tradeoff.png): Frechet distance, precision and recall (1st ruler) against
    the guidance scale w for the MSE model and the self-perceptual model, from the sweeps (w = 1: unguided), each
    point with its 95% bootstrap interval over the sweep's samples (where the sweep stored it), the unguided
    self-perceptual point ringed and the real-vs-real ceiling of precision and recall dashed. The bars are the
    sampling error of one training run alone (every w shares the sweep's seed; the chosen w is the one whose FD
    was lowest on these same samples, so its bar is optimistic); two overlapping bars are not a test: the paired
    verdicts of results.md are."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {"MSE + guidance": ("tab:red", res["guidance_sweep"]),
              "self-perceptual + guidance": ("tab:blue", res["sp_guidance_sweep"])}
    ceiling = res.get("sweep_prdc_ceiling") or {}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key in zip(axes, ["fd", "precision", "recall"]):
        for name, (colour, pts) in curves.items():
            w, v = [p["cfg_scale"] for p in pts], [p[key] for p in pts]
            ci = [p.get(key + "_ci") or [p[key], p[key]] for p in pts]
            ax.errorbar(w, v, yerr=[[y - c[0] for y, c in zip(v, ci)], [c[1] - y for y, c in zip(v, ci)]],
                        color=colour, marker="o", capsize=3, label=name)
            if name.startswith("self") and 1.0 in w:
                ax.plot([1.0], [v[w.index(1.0)]], "o", ms=12, mfc="none", color=colour, label="unguided (w = 1)")
        if key in ceiling:
            ax.axhline(ceiling[key], color="gray", ls="--", lw=1, label="real vs real")
        ax.set_xlabel("guidance scale w")
        ax.set_title(f"Frechet distance ({res['protocol']['features']})" if key == "fd" else key, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"guidance sweeps of one training run: {res['settings']['sweep_n']} samples per point, 95% "
                 "bootstrap intervals of its sampling error (not a test: see the paired verdicts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def loss_curves_picture(folders, path):
    """The training curves of a run's stages (loss_curves.png), read from each stage folder's metrics log: loss and
    gradient norm against the stage's own steps, MSE objectives and self-perceptual ones in panels of their own
    (their losses differ by orders of magnitude). folders: {stage name: its folder}; a stage without a log (the
    shipped stage 1) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = {}
    for name, folder in folders.items():
        try:
            with open(os.path.join(folder, perceptual_diffusion.METRICS)) as f:
                logs[name] = [json.loads(line) for line in f]
        except (OSError, ValueError):
            continue
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), squeeze=False)
    for col, kind in enumerate(("mse", "self-perceptual")):
        for name, recs in logs.items():
            if recs and (name.startswith("sp") or name == "self-perceptual") == (kind == "self-perceptual"):
                steps = [r["step"] for r in recs]
                axes[0, col].plot(steps, [r["loss"] for r in recs], label=name)
                axes[1, col].plot(steps, [r["grad_norm"] for r in recs], label=name)
        axes[0, col].set_title(f"{kind} stages: loss (mean between log lines)", fontsize=9)
        axes[1, col].set_title("gradient norm before clipping", fontsize=9)
        for ax in axes[:, col]:
            ax.set_xlabel("step of the stage")
            if ax.lines and all(min(line.get_ydata()) > 0 for line in ax.lines):   # t' = t's loss is exactly 0
                ax.set_yscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return sorted(logs)


def results_markdown(res):
    """The results tables with their intervals and protocol, and what they say about the paper's ordering."""
    rows, proto, real = res["rows"], res["protocol"], res["real"]
    first = proto["features"]
    c = cell
    lines = [f"| row | model | sampled | train steps | Frechet distance ({first}) | Frechet distance (random features) | "
             f"KID ({first}) | KID (random features) | cond. accuracy | class entropy | rarest class | sampling s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"Frechet distance ({first}): {rows[0]['fd_protocol']}." if "fd_protocol" in rows[0] else "", ""] + lines
    if res.get("standard_fid"):
        lines = [f"FID by the standard protocol ({res['standard_fid_protocol']}): " + ", ".join(
            f"row {k} {v:.2f}" for k, v in res["standard_fid"].items()) + ".", ""] + lines
    for r in rows:
        how = {"cond": "no guidance", "null": "null label, no guidance"}.get(r["mode"], f"w={r['cfg_scale']:g}, phi={r['cfg_rescale']:g}")
        lines.append(f"| {r['row']} | {r['name']} | {how} | {r['train_steps']} | {c(r, 'fd')} | {c(r, 'fd_random')} | "
                     f"{c(r, 'kid')} | {c(r, 'kid_random')} | {c(r, 'cond_acc')} | {c(r, 'class_entropy')} | {c(r, 'rarest_class')} | "
                     f"{r['sample_seconds']} |")
    if "class_entropy" in real:
        lines.append(f"| - | real images | - | - | - | - | - | - | - | {real['class_entropy']:.3f} | {real['rarest_class']:.3f} | - |")
    lines += ["", "Pixel statistics (images in [0, 1]; spectrum distance: RMS over radii of log10 of the radially "
              "averaged power spectrum's ratio to the real images'):", "",
              "| row | mean | std | saturation | contrast | spectrum distance |", "|---|---|---|---|---|---|",
              f"| real | {real['mean']:.3f} | {real['std']:.3f} | {real['saturation']:.3f} | {real['contrast']:.3f} | 0 |"]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(c(r, k) for k in ("mean", "std", "saturation", "contrast",
                                                                        "spectrum_dist")) + " |")
    ceil, k_used = res["prdc_ceiling"], min(rows[0]["samples"], proto["real_images"])
    lines += ["", f"Realism and diversity: precision and recall (k = 3), density and coverage (k = 5), on features "
              f"standardised by the real set's, {k_used} real against {k_used} generated"
              + (f" (the first {k_used} of each row's {rows[0]['samples']} samples)" if k_used < rows[0]["samples"] else "")
              + "; the ceiling is one real subset against another, disjoint one (what a perfect model scores at this "
              "n):", "", "| row | " + " | ".join(f"{k} ({first})" for k in PRDC) + " | " +
              " | ".join(f"{k} (random)" for k in PRDC) + " |", "|---|" + "---|" * 8,
              "| real vs real | " + (" | ".join(f"{ceil[k]:.3f}" for k in SWEEP_KEYS[2:]) if ceil else
                                     f"no ceiling: it needs 2 x {k_used} real images, there are {proto['real_images']}"
                                     + " |" * 7) + " |"]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(c(r, k) for k in SWEEP_KEYS[2:]) + " |")
    lines += ["", f"Paired differences (row a - row b: the rows share their initial noise and labels; 95% paired "
              f"bootstrap interval, {rows[0]['bootstrap_resamples']} resamples). These verdicts rest on ONE training run "
              f"of each stage (seed {res['train']['seed']}) and {rows[0]['samples']} samples per row: they describe this "
              "run, not the method (reproduce --seeds K pools K training runs):", ""]
    lines += verdict_lines(res["verdicts"])
    lines += ["", rulers_line(res["verdicts"]), "", convergence_line(res)]
    lines += ["", "x0_hat from one step (`x0_hat.png`): high-frequency energy relative to real images (1 = as sharp)"
              f" and Frechet distance ({first}) to the real images, on {res['x0_hat_images']}:", "",
              "| t | " + " | ".join(f"{k}: high-freq / FD" for k in res["x0_hat"][0] if k != "t") + " |",
              "|---|" + "---|" * (len(res["x0_hat"][0]) - 1)]
    for row in res["x0_hat"]:
        lines.append(f"| {row['t']} | " + " | ".join(f"{v['high_freq']:.3f} {fmt_ci(v['high_freq_ci'])} / {v['fd']:.3f} "
                                                      f"{fmt_ci(v['fd_ci'])}" for k, v in row.items() if k != "t") + " |")
    r0 = rows[0]
    lines += ["", f"Protocol: {r0['samples']} samples per row, {r0['sampler']} eta={r0['eta']}, {r0['steps']} steps, "
              f"{r0['spacing']} spacing, seed {r0['seed']}, labels cycling through the classes (rows 6-8 and 10: the "
              f"null label), the same initial noise in every row; real statistics from {proto['real_images']} "
              f"{proto['data']} images of the {proto['real_split']} split; first ruler: {first}"
              + (f" (its accuracy on those real images: {proto['classifier_accuracy_on_real']:.3f})"
                 if "classifier_accuracy_on_real" in proto else "") + "; second ruler: fixed random features. "
              "Intervals: 95%, bootstrap over the samples (real statistics held fixed), percentile interval "
              "shifted to the estimate. A Frechet distance is biased upwards at finite n (two samples of one "
              "distribution score above 0, by an amount that depends on each row's covariance); KID (unbiased MMD^2, "
              "cubic kernel) is not, and scores about 0 there.", "",
              "Guidance sweep for row 3 (other seed, " + f"{res['settings']['sweep_n']} samples): " +
              ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in res["guidance_sweep"]) +
              f"; chosen w={res['guidance'][0]:g}, phi={res['guidance'][1]:g}. Autoguidance sweep (null label; guide: "
              f"stage 1's EMA at 1/8 of its steps): " + ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in
                                                                   res["autoguidance_sweep"]) +
              f"; chosen w={res['autoguidance'][0]:g} for rows 9 and 10. Guidance sweep of the self-perceptual model "
              "for row 5: " + ", ".join(f"w={s['cfg_scale']:g}: {s['fd']:.3f}" for s in res["sp_guidance_sweep"]) +
              f"; chosen w={res['sp_guidance'][0]:g}.", ""] + [f"Note: {n}" for n in res["notes"]] + ["",
              f"Wall time {res['wall_seconds'] / 60:.1f} min on {res['device']} ({res['torch_threads']} torch threads)"
              + (f"; stages reused from an earlier run: {', '.join(res['reused_stages'])}" if res["reused_stages"] else "")
              + "."]
    return "\n".join(lines) + "\n"


def cell(r, k):
    """A row's metric k with its interval, as text ("-" when the row has none)."""
    return f"{r[k]:.3f} {fmt_ci(r[k + '_ci'])}" if k in r else "-"


def verdict_lines(verdicts):
    """The paired verdicts as a table, one line per pair and metric."""
    return ["| a - b | question | metric | difference [95% interval] | verdict |", "|---|---|---|---|---|"] + [
        f"| {v['a']} - {v['b']} | {v['what']} | {name} | {v[k]['diff']:+.4f} {fmt_ci(v[k]['ci'])} | {v[k]['verdict']} |"
        for v in verdicts for k, name, _ in VERDICT_METRICS if k in v]


def rulers_line(verdicts):
    """One line: the comparisons where both rulers give the same verdict, and those where they differ."""
    agree, differ = [], []
    for v in verdicts:
        if "fd" in v and "fd_random" in v:
            (agree if v["fd"]["verdict"] == v["fd_random"]["verdict"] else differ).append(f"{v['a']}-{v['b']}")
    return (f"Rulers: the two Frechet distances agree on {', '.join(agree) or 'no comparison'}; they disagree on "
            f"{', '.join(differ) or 'none'}.")


def convergence_line(res):
    """Is stage 1 converged? The control's gain over row 1, and what it means for the row-4-vs-row-1 verdict."""
    r1, r2 = (next(r for r in res["rows"] if r["row"] == k) for k in (1, 2))
    gain = (r1["fd"] - r2["fd"]) / r1["fd"] if r1["fd"] > 0 else 0.0
    v = next(v for v in res["verdicts"] if (v["a"], v["b"]) == (2, 1))["fd"]
    text = (f"Convergence of stage 1: the control (row 2, {r2['train_steps'] - r1['train_steps']} more MSE steps) "
            f"changed the Frechet distance by {-100 * gain:+.0f}% against row 1 ({v['diff']:+.3f} {fmt_ci(v['ci'])}).")
    if v["ci"][0] <= 0 <= v["ci"][1]:
        text += (" That change is not distinguishable from none at this sample size (which does not show that stage 1 "
                 "converged); row 4 against row 2 stays the fair comparison.")
    elif v["diff"] > 0:
        text += (" The control got measurably WORSE than stage 1, so the extra steps alone moved the model: row 4 "
                 "against row 1 mixes the objective with that change; row 4 against row 2 is the fair comparison.")
    elif gain > 0.1:
        text += (" That gain is large: stage 1 was not converged, so row 4 against row 1 mixes the objective with "
                 "training length; row 4 against row 2 is the fair comparison.")
    else:
        text += " The gain is under 10% but measurable: row 4 against row 2 remains the fair comparison."
    return text


def ablations_markdown(res):
    """The ablation table: each variant evaluated exactly like row 4, with paired verdicts against rows 4 and 2."""
    keys = ["fd", "fd_random", "kid", "precision", "recall", "cond_acc"]
    rows = [next(r for r in res["rows"] if r["row"] == 4)] + [a["ablation"] for a in res["ablations"]]
    lines = ["| row | variant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['row']} | {r['name']} | " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    lines += ["", f"Each variant: {res['settings']['stage2_steps']} stage-2 steps at lr {res['settings']['stage2_lr']:g} "
              "from the same stage-1 checkpoint as row 4, sampled and measured exactly like row 4 (same noise, labels "
              "and rulers); 95% paired bootstrap intervals, one training run:", ""]
    return "\n".join(lines + verdict_lines([v for a in res["ablations"] for v in a["verdicts"]])) + "\n"


def pooled_markdown(pooled):
    """The pooled verdicts, each with its interval over seeds and k of K, the rows over seeds, and the sources."""
    K = len(pooled["seeds"])
    about = ("Verdicts about fine-tuning one model (the paper's situation), not about the method over stage-1 "
             f"seeds: every seed fine-tunes the shipped stage 1, so only the stage-2 and sampling seeds vary ({K}: "
             if pooled.get("stage1_source") == "shipped" else
             f"Verdicts about the method: {K} full-pipeline training seeds (")
    lines = [f"{about}{', '.join(map(str, pooled['seeds']))}), "
             f"{pooled['samples_per_row']} samples per row and seed. Estimate: the mean over seeds of the paired "
             f"difference row a - row b; interval: 95% t interval over the seeds (it includes the variance between "
             "training runs and the sampling variance); a verdict is called only when it excludes 0; 'k of K': the "
             "seeds whose own bootstrap verdict named the same row.", "",
             "| a - b | question | metric | mean difference | 95% interval over seeds | verdict | held in |",
             "|---|---|---|---|---|---|---|"]
    names = {k: n for k, n, _ in VERDICT_METRICS}
    for v in pooled["verdicts"]:
        for key in names:
            if key in v:
                e = v[key]
                lines.append(f"| {v['a']} - {v['b']} | {v['what']} | {names[key]} | {e['diff']:+.4f} | "
                             f"{fmt_ci(e['ci']) if e['ci'] else '-'} | {e['verdict']} | {e['held']} of {e['seeds']} |")
    lines += ["", "Rows over seeds (mean and 95% interval; sd between seeds beside the mean sampling standard error):",
              "", "| row | model | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
    for r in pooled["rows"]:
        spread = lambda e: f"{e['mean']:.3f} {fmt_ci(e['ci']) if e['ci'] else ''} (sd {e['sd_seeds'] or 0:.3f} / se {e['se_sampling']:.3f})"
        lines.append(f"| {r['row']} | {r['name']} | " + " | ".join(spread(r[k]) if k in r else "-" for k in METRIC_KEYS) + " |")
    if pooled.get("variant_judgements"):
        lines += ["", f"Variants against the fair control, judged by the rule stated in advance: {HELPS_RULE}.", "",
                  "| row | variant | verdict |", "|---|---|---|"]
        lines += [f"| {j['row']} | {j['key']} | {j['verdict']} |" for j in pooled["variant_judgements"]]
    if pooled["sources"]:
        J = pooled["stage2_seeds"]
        lines += ["", f"Where the spread comes from (standard deviations): sampling alone / stage-2 seeds on one stage 1 "
                  f"({J + 1} runs sharing seed {pooled['seeds'][0]}'s stage 1: {J} degrees of freedom) / stage-1 seeds "
                  f"({K} seeds: {K - 1} degrees of freedom). '-': no such source (a row of stage 1 alone); '0*': the "
                  "variance estimate was negative, shown as 0. With this few degrees of freedom each share is rough.",
                  "", "| row | model | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
        share = lambda e, part: ("-" if part not in e else "0*" if part in e["clamped"] else f"{e[part]:.3f}")
        for r in pooled["sources"]:
            lines.append(f"| {r['row']} | {r['name']} | " + " | ".join(
                " / ".join(share(r[k], part) for part in ("sampling", "stage2", "stage1")) if k in r else "-"
                for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def lengths_markdown(summary):
    """The length sweep as tables: the pooled 4 - 2 and 4 - 1 verdicts per length, rows 2 and 4, and the settling."""
    names = {k: n for k, n, _ in VERDICT_METRICS}
    lines = ["Self-perceptual fine-tuning (row 4) against the fair control (row 2: MSE for as many steps) and against "
             "the model both start from (row 1), per stage-2 length; mean over seeds of the paired differences, 95% t "
             "interval over seeds, 'held': seeds whose own verdict named the same row.", "",
             "| stage-2 steps | seeds | a - b | metric | mean difference | 95% interval | verdict | held |",
             "|---|---|---|---|---|---|---|---|"]
    for L in summary["lengths"]:
        for pair, vs in summary["per_length"][L]["verdicts"].items():
            for m, e in vs.items():
                lines.append(f"| {L} | {len(summary['seeds'][L])} | {pair.replace('-', ' - ')} | {names[m]} | "
                             f"{e['diff']:+.4f} | {fmt_ci(e['ci']) if e['ci'] else '-'} | {e['verdict']} | "
                             f"{e['held']} of {e['seeds']} |")
    lines += ["", "| stage-2 steps | row | " + " | ".join(LENGTH_METRICS) + " |", "|---|---|" + "---|" * len(LENGTH_METRICS)]
    for L in summary["lengths"]:
        for r, ms in summary["per_length"][L]["rows"].items():
            lines.append(f"| {L} | {r} | " + " | ".join(f"{ms[m]['mean']:.3f} {fmt_ci(ms[m]['ci']) if ms[m]['ci'] else ''}"
                                                       for m in LENGTH_METRICS) + " |")
    for m, s in summary["settled"].items():
        lines.append("" if m == PRIMARY[0] else None)
        if s is None:
            lines.append(f"{names[m]}: whether the 4 - 2 difference has settled is not known (fewer than two lengths, "
                         "fewer than two seeds common to the two longest, or a paired interval of zero width).")
            continue
        change = (f"its change from {s['from']} to {s['to']} steps, paired over seeds {s['seeds']}, is "
                  f"{s['change']:+.4f} {fmt_ci(s['ci'])}")
        lines.append(f"{names[m]}: " + (f"settled: {change}, which holds 0 (no change detected; changes up to "
                                        f"{max(abs(v) for v in s['ci']):.4f} are not excluded)." if s["settled"]
                                        else f"NOT settled: {change}, which excludes 0 (the 4 - 2 difference still moves)."))
    lines = [line for line in lines if line is not None]
    return "\n".join(lines) + "\n"


def length_picture(summary, path):
    """stage2_length.png: the first ruler's Frechet distance, precision and recall of rows 2 (MSE continued) and 4
    (self-perceptual) against stage-2 steps, each point the mean over seeds with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    L = summary["lengths"]
    for ax, m in zip(axes, ("fd", "precision", "recall")):
        for r, name, shift in ((2, "2: MSE continued (control)", 0.97), (4, "4: self-perceptual", 1.03)):
            e = [summary["per_length"][x]["rows"][r][m] for x in L]
            mean = [p["mean"] for p in e]
            err = [[p["mean"] - (p["ci"] or [p["mean"]] * 2)[0] for p in e], [(p["ci"] or [p["mean"]] * 2)[1] - p["mean"] for p in e]]
            ax.errorbar([x * shift for x in L], mean, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("stage-2 steps (and the control's)")
        ax.set_title({"fd": "Frechet distance (1st ruler)", "precision": "precision", "recall": "recall"}[m])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_outputs(out, files, log):
    """Write finished text files; if one cannot be written (disk full, folder removed), say so in one line and
    keep the others: the numbers are also in the log above."""
    for name, text in files.items():
        try:
            with open(os.path.join(out, name), "w") as f:
                f.write(text)
        except OSError as e:
            log(f"error: could not write {os.path.join(out, name)} ({e.strerror or e}); its content is not lost: "
                f"the rows are in the log above")
