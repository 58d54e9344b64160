"""Intervals and verdicts: the bootstrap interval, the paired verdict of one run, and verdicts and rows pooled
over training seeds with t intervals; the variants' rule; the stage-2 length summary.
"""
import math

import numpy as np
import scipy.stats
import torch



def interval(estimate, replicates, level=0.95, centred=True):
    """The bootstrap percentile interval, shifted so the replicates' median sits on the estimate (resampling with
    replacement biases a Frechet distance upwards; the shift removes that bias, not the spread); centred=False:
    the plain percentile interval."""
    q = torch.quantile(replicates.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2, 0.5], dtype=torch.float64))
    shift = q[2] - float(estimate) if centred else 0.0
    return [float(q[0] - shift), float(q[1] - shift)]


PRDC = ["precision", "recall", "density", "coverage"]


SWEEP_KEYS = ["fd", "fd_random"] + PRDC + [k + "_random" for k in PRDC]


METRIC_KEYS = ["fd", "fd_random", "kid", "kid_random", "cond_acc", "saturation"] + SWEEP_KEYS[2:]  # pooled over seeds


VERDICT_METRICS = [("fd", "Frechet distance, 1st ruler", -1), ("fd_random", "Frechet distance, random features", -1),
                   ("kid", "KID, 1st ruler", -1), ("kid_random", "KID, random features", -1),
                   ("cond_acc", "conditional accuracy", 1)] + [
    (k + sfx, f"{k}, {ruler}", 1) for sfx, ruler in (("", "1st ruler"), ("_random", "random features")) for k in PRDC]


def verdict(a, b, what, rows, boots):
    """The paired verdicts of row a against row b, one per metric both rows have: the difference a - b, its 95%
    paired bootstrap interval, and the verdict it supports (sign -1: lower is better)."""
    out = {"a": a, "b": b, "what": what}
    for key, _, sign in VERDICT_METRICS:
        if key in rows[a] and key in rows[b]:
            d = rows[a][key] - rows[b][key]
            # Recall's resampled replicates are too narrow and biased, coverage's too wide (a resample has about
            # 0.63 n distinct points): in null experiments the plain interval called recall in 3-9% and the
            # centred one coverage in 1-3% (n 100-600, D 8-64); centring recall called 10-15%, plain coverage up to 10%.
            ci = interval(d, boots[a][key] - boots[b][key], centred=not key.startswith("recall"))
            word = (f"row {a if (d > 0) == (sign > 0) else b} better in this run" if excludes_zero(ci) else
                    "not distinguishable in this run" if informative(ci) else "no verdict: the interval is not finite "
                    "or has zero width")
            out[key] = {"diff": d, "ci": ci, "verdict": word}
    return out


def informative(ci):
    """An interval that can carry a verdict: finite, of positive width (K identical values, a NaN: none)."""
    return all(math.isfinite(v) for v in ci) and ci[1] > ci[0]


def excludes_zero(ci):
    """A verdict is called: the interval is informative and 0 lies outside it."""
    return informative(ci) and not ci[0] <= 0 <= ci[1]


def pooled_interval(values, level=0.95):
    """(mean, 95% interval) over K training seeds: the t interval mean +- t_{K-1} sd / sqrt(K). Each seed's value
    already carries its own sampling noise, so the spread of the values contains the variance between training
    runs *and* the sampling variance: the interval is about the method, not one run. None for K = 1."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), None
    half = scipy.stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), [float(v.mean() - half), float(v.mean() + half)]


def all_verdicts(res):
    """A result's verdicts, the ablations' included."""
    return res["verdicts"] + [v for a in res.get("ablations", []) for v in a["verdicts"]]


def pooled_verdicts(results):
    """For every pair (matched by its rows, in every seed) and metric: the mean over seeds of the per-seed paired differences, its pooled interval,
    the verdict called only when that interval excludes 0, and in how many seeds the per-seed verdict agreed."""
    out, by_pair = [], [{(v["a"], v["b"]): v for v in all_verdicts(r)} for r in results]
    for v0 in all_verdicts(results[0]):
        if not all((v0["a"], v0["b"]) in seed for seed in by_pair):    # a pair some seed lacks is not pooled
            continue
        per_seed = [seed[v0["a"], v0["b"]] for seed in by_pair]
        entry = {"a": v0["a"], "b": v0["b"], "what": v0["what"]}
        for key, _, sign in VERDICT_METRICS:
            if key not in v0:
                continue
            diffs = [v[key]["diff"] for v in per_seed]
            mean, ci = pooled_interval(diffs)
            better = v0["a"] if (mean > 0) == (sign > 0) else v0["b"]
            held = sum(v[key]["verdict"] == f"row {better} better in this run" for v in per_seed)
            word = (f"row {better} better" if ci and excludes_zero(ci) else "not distinguishable over seeds"
                    if ci and informative(ci) else "no verdict: the interval is not finite or has zero width" if ci
                    else "one training run: no verdict about the method")
            entry[key] = {"diff": mean, "ci": ci, "verdict": word, "held": held, "seeds": len(results),
                          "per_seed": diffs}
        out.append(entry)
    return out


def pooled_rows(results):
    """Each row's metrics over seeds: mean, pooled interval, and the sampling standard error (the bootstrap
    interval's width / 3.92, as the root of the seeds' mean variance) beside the standard deviation between seeds."""
    rows = []
    for i, r0 in enumerate(results[0]["rows"]):
        row = {"row": r0["row"], "name": r0["name"], "model": r0.get("model")}
        for key in METRIC_KEYS:
            if key in r0:
                vals = [r["rows"][i][key] for r in results]
                mean, ci = pooled_interval(vals)
                row[key] = {"mean": mean, "ci": ci, "sd_seeds": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                            "se_sampling": float(np.mean([((r["rows"][i][key + "_ci"][1] - r["rows"][i][key + "_ci"][0])
                                                           / 3.92) ** 2 for r in results])) ** 0.5}
        rows.append(row)
    return rows


def variance_sources(a, b):
    """Where the spread between seeds comes from, per row and metric, as standard deviations, from pooled_rows of
    the full design (a: K stage-1 seeds) and of the shared-stage-1 design (b: J + 1 runs on one stage 1):
    sampling alone (the bootstrap's mean variance), stage-2 seeds (b's variance less sampling) and stage-1 seeds
    (a's less b's). A row drawn from stage 1 alone (rows 1, 3, 6, 9, 10) has no stage-2 source: its b-spread is
    sampling, and its stage-1 share is a's variance less sampling. A negative variance estimate is reported as 0
    and named in `clamped`; with K - 1 and J degrees of freedom, such estimates are common, not exact zeros."""
    out = []
    for ra, rb in zip(a, b):
        row = {"row": ra["row"], "name": ra["name"]}
        for key in METRIC_KEYS:
            if key in ra:
                se2, var_s2, var_full = rb[key]["se_sampling"] ** 2, rb[key]["sd_seeds"] ** 2, ra[key]["sd_seeds"] ** 2
                parts = ({"sampling": se2, "stage2": var_s2 - se2, "stage1": var_full - var_s2} if ra.get("model") != "mse"
                         else {"sampling": se2, "stage1": var_full - se2})
                row[key] = {**{k: max(v, 0.0) ** 0.5 for k, v in parts.items()},
                            "clamped": [k for k, v in parts.items() if v < 0], "sd_full": ra[key]["sd_seeds"],
                            "sd_shared": rb[key]["sd_seeds"]}
        out.append(row)
    return out


HELPS_RULE = ("a variant helps only if its pooled interval against the fair control (row 2) excludes 0 in its favour "
              "on a primary measure named in advance (the first ruler's Frechet distance or precision), that verdict "
              "held in at least 4 of every 5 seeds, and neither recall nor coverage is significantly worse than the "
              "control's (its pooled interval does not exclude 0 against the variant); every other result is "
              "reported as measured. Four variants and two primary measures are judged without a correction for "
              "multiplicity: a single 'helps' is a lead to test again, not a finding")


PRIMARY = ["fd", "precision"]


LENGTH_METRICS = ["fd", "precision", "recall", "coverage"]


def length_summary(per):
    """{stage-2 steps: pooled} -> per length, the pooled verdicts 4 - 2 and 4 - 1 and rows 2 and 4 (mean and interval
    over seeds) on LENGTH_METRICS; and per primary measure whether the 4 - 2 curve has settled, from the seeds that
    ran both of the two longest lengths, paired: the change of each seed's 4 - 2 difference from the shorter to the
    longer length, with its 95% t interval. Settled: the interval holds 0 (no change detected; changes as large as
    its ends are not excluded, and are stated); still moving: it excludes 0; not known: fewer than two lengths or
    two common seeds."""
    lengths = sorted(per)
    out = {"lengths": lengths, "seeds": {L: per[L]["seeds"] for L in lengths}, "per_length": {}, "settled": {}}
    for L in lengths:
        v = {(x["a"], x["b"]): x for x in per[L]["verdicts"]}
        rows = {r["row"]: r for r in per[L]["rows"]}
        out["per_length"][L] = {
            "verdicts": {f"{a}-{b}": {m: {k: v[a, b][m][k] for k in ("diff", "ci", "verdict", "held", "seeds")}
                                      for m in LENGTH_METRICS if m in v[a, b]} for a, b in ((4, 2), (4, 1))},
            "rows": {r: {m: {k: rows[r][m][k] for k in ("mean", "ci")} for m in LENGTH_METRICS} for r in (2, 4)}}
    for m in PRIMARY:
        out["settled"][m] = None
        if len(lengths) < 2:
            continue
        short, long_ = ({s: d for s, d in zip(per[L]["seeds"], per_seed(per[L], m))} for L in lengths[-2:])
        common = sorted(set(short) & set(long_))
        mean, ci = pooled_interval([long_[s] - short[s] for s in common])
        if ci is not None:
            out["settled"][m] = None if not informative(ci) else {  # a zero-width or NaN interval decides nothing
                                 "settled": not excludes_zero(ci), "change": mean, "ci": ci, "seeds": common,
                                 "from": lengths[-2], "to": lengths[-1]}
    return out


def per_seed(pooled, m):
    """The per-seed 4 - 2 differences of metric m in a pooled result."""
    return next(v for v in pooled["verdicts"] if (v["a"], v["b"]) == (4, 2))[m]["per_seed"]
