"""The paper's comparison: its definition (PRESETS, ROWS, PAIRS, ABLATIONS) on the first screen, then the pipeline
(stage 1, stage 2 and the fair control, every row measured alike), seeds and the stage-2 length sweep.
"""
import importlib.util
import json
import math
import os
import shlex
import time

import torch

from perceptual_diffusion import (TRAIN_DEFAULTS, UsageError, check_flags, distributed, load_checkpoint,
                                  model_from_checkpoint, origin_of, schedule_from, train, weights_hash, writable_dir)
from .report import (ablations_markdown, comparison_picture, fmt_ci, length_picture, lengths_markdown,
                     loss_curves_picture, pooled_markdown, results_markdown, tradeoff_picture, write_outputs)
from .rulers import CLASSIFIER_STEPS, Ruler, STANDARD_FID, evaluate_model, standard_fid, x0_hat_study
from .stats import PRIMARY, SWEEP_KEYS, length_summary, pooled_rows, pooled_verdicts, variance_sources, verdict


STAGE2_STEPS_CPU = 600    # the default run's stage 2 and control (1.5x the earlier 400), sized to its budget (README, Cost)


PRESETS = {
    # The default run, sized for the slowest 2-core CPU measured (AVX2, no native bf16: README, Cost): shapes at
    # 16 pixels, a 0.69M-parameter UNet (16 base channels, most of its width at low resolution, where it is
    # cheap), batch 32, fp32 (bf16 autocast ran convolutions 15x SLOWER there), the paper's beta schedule. Stage 1
    # is the shipped model (pretrained/: this preset's stage 1 trained 50,000 steps), fine-tuned as the paper
    # fine-tunes a pretrained model; --stage1 train trains a 2,000-step one instead (it draws blobs).
    "cpu": dict(train=dict(data="shapes", image_size=16, channels=16, channel_mult="1,2,4", attn_res="4",
                           betas="scaled_linear", precision="fp32", batch_size=32, lr=2e-3, warmup=50, ema_decay=0.995,
                           log_every=250, sample_every=0, ckpt_every=250),
                stage1="shipped", stage1_steps=2000, stage2_steps=STAGE2_STEPS_CPU, stage2_lr=5e-4, cooldown=0.2,
                features="classifier",
                classifier_steps=CLASSIFIER_STEPS,
                real_n=2000, eval_n=600, sweep_n=150, sweep_scales=[1.5, 2.0, 3.0], cfg_rescale=0.7,
                eval_steps=16, picture_per_class=3, resamples=1000, x0_n=500, x0_show=4),
    # DDPM's CIFAR-10 network and optimisation (Ho et al. 2020: 35.7M parameters, batch 128, lr 2e-4, warm-up 5,000,
    # EMA 0.9999, dropout 0.1, 400k steps) as stage 1, with this project's schedule, v-prediction and cool-down; stage 2
    # and the control 50k steps each: 2.7e18 FLOPs counted with the evaluation, about 6.1 h on one GPU at ASSUMPTION.
    # Standard FID (50,000 samples against the training set) for rows 1-4 beside the held-out comparison.
    "cifar10": dict(target="gpu", fid_protocol="standard", fid_n=50_000, train=dict(data="cifar10", channels=128, channel_mult="1,2,2,2", num_res_blocks=2, attn_res="16",
                               dropout=0.1, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, log_every=500,
                               sample_every=10000, ckpt_every=5000),
                    stage1="train", stage1_steps=400_000, stage2_steps=50_000, stage2_lr=2e-5, cooldown=0.2, features="fid",
                    classifier_steps=CLASSIFIER_STEPS, real_n=10000, eval_n=10000, sweep_n=2000, sweep_scales=[1.5, 2.0, 3.0],
                    cfg_rescale=0.7, eval_steps=50, picture_per_class=2, resamples=200, x0_n=1000, x0_show=4),
    # A seconds-long pass through every stage: checks the pipeline, measures nothing.
    "smoke": dict(train=dict(data="shapes", image_size=16, channels=8, channel_mult="1,2", attn_res="", precision="fp32",
                             batch_size=8, lr=1e-3, warmup=1, ema_decay=0.9, log_every=1, sample_every=0, ckpt_every=100),
                  stage1="train", stage1_steps=2, stage2_steps=1, stage2_lr=1e-3, cooldown=0.5, features="classifier", classifier_steps=1,
                  real_n=40, eval_n=20, sweep_n=10, sweep_scales=[2.0, 3.0], cfg_rescale=0.7, eval_steps=2,
                  picture_per_class=1, resamples=50, x0_n=20, x0_show=2),
}


# The method over stage-1 seeds: the cpu preset training its own stage 1, five times longer (10,000 steps, <= 60
# minutes on the same 2 cores), and the stage 2 of the earlier default (400 steps). Its EMA half-life is 7% of
# stage 1 (0.999: 693 steps of 10,000).
PRESETS["cpu-long"] = {**PRESETS["cpu"], "stage1": "train", "stage1_steps": 10000, "stage2_steps": 400,
                       "train": {**PRESETS["cpu"]["train"], "ema_decay": 0.999, "log_every": 500, "ckpt_every": 500}}


# The cifar10 recipe at half the channel width (64: 8.95M parameters, a quarter of the FLOPs), everything else as
# DDPM's: 6.3e17 training FLOPs, about 1.6 h on one A100-class GPU at ASSUMPTION with its evaluation.
PRESETS["cifar10-quick"] = {**PRESETS["cifar10"], "train": {**PRESETS["cifar10"]["train"], "channels": 64}}


# The shipped stage 1 (`python reproduce.py pretrain` regenerates it): the cpu preset's stage 1 trained 50,000
# steps with EMA 0.9995 (half-life 1,386 steps), its weights and guide stored in fp16 with a sha256 each.
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")


PRETRAINED = {"mse": os.path.join(PRETRAINED_DIR, "shapes16-mse.pt"), "guide": os.path.join(PRETRAINED_DIR, "shapes16-guide.pt"),
              "card": os.path.join(PRETRAINED_DIR, "shapes16.json")}


SHIPPED_KEYS = ["data", "data_seed", "image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "dropout",
                "T", "betas", "unconditional"]   # what a run must share with the shipped model to start from it


ROWS = [  # (row, name, which trained model, how it is sampled: "cond" unguided, "cfg" classifier-free guidance,
    #        "null" null label, "auto" / "auto-null" autoguidance with the label / with the null label)
    (1, "MSE", "mse", "cond"),
    (2, "MSE, continued", "mse-continued", "cond"),
    (3, "MSE + guidance", "mse", "cfg"),
    (4, "self-perceptual", "self-perceptual", "cond"),
    (5, "self-perceptual + guidance", "self-perceptual", "cfg"),
    (6, "MSE, unconditional", "mse", "null"),
    (7, "MSE continued, unconditional", "mse-continued", "null"),
    (8, "self-perceptual, unconditional", "self-perceptual", "null"),
    (9, "MSE + autoguidance", "mse", "auto"),                      # guided by stage 1's EMA at 1/8 of its steps
    (10, "MSE + autoguidance, unconditional", "mse", "auto-null"),
]


PAIRS = [  # (row a, row b, what the paired difference a - b asks)
    (4, 1, "self-perceptual vs the MSE model it started from (the paper's claim)"),
    (4, 2, "self-perceptual vs MSE trained as long (the fair comparison)"),
    (2, 1, "the control's gain from the extra MSE steps (is stage 1 converged?)"),
    (3, 4, "MSE + guidance vs self-perceptual (the paper: guidance stays ahead)"),
    (5, 3, "self-perceptual + guidance vs MSE + guidance"),
    (8, 6, "unconditional: self-perceptual vs MSE"),
    (8, 7, "unconditional: self-perceptual vs MSE trained as long"),
    (9, 3, "autoguidance vs classifier-free guidance (conditional)"),
    (8, 10, "unconditional: self-perceptual vs MSE + autoguidance (the label-free rival)"),
]


# The training flags that reproduce passes on (they override the preset's; the stages set loss, steps, lr, init).
REPRODUCE_TRAIN_ARGS = {"data", "data_dir", "data_seed", "image_size", "no_flip", "channels", "channel_mult",
                        "num_res_blocks", "attn_res", "dropout", "T", "betas", "batch_size", "lr", "warmup",
                        "weight_decay", "grad_clip", "ema_decay", "label_dropout", "precision", "compile"}


# The paper's ablations of the self-perceptual objective: one stage-2 run each, evaluated exactly like row 4.
# Then the variants beyond the paper, as others use perceptual losses (shared EVAL_NOTES): the latent perceptual
# loss's combination (MSE at every step, the perceptual term only at low noise, t < T/5), the term added to MSE at
# every t, and t' from low noise only. Each takes row 20 + its place here; with --ablations NAMES only those run.
ABLATIONS = [("all-layers", "all layers (down + mid), each normalised", dict(sp_features="all")),
             ("t-prime-same", "t' = t", dict(sp_t_prime="same")),
             ("mae", "MAE distance", dict(sp_distance="mae")),
             ("ema-perceptual", "EMA of the online model as f*", dict(perceptual_net="ema")),
             ("lpl-gated", "MSE + lambda L_sp at t < T/5 only (LPL-style), lambda auto",
              dict(sp_with_mse="auto", sp_t_max=0.2)),
             ("plus-mse", "MSE + lambda L_sp at every t, lambda auto", dict(sp_with_mse="auto")),
             ("t-prime-low", "t' < T/5 only", dict(sp_t_prime_max=0.2))]


VARIANTS = ["lpl-gated", "plus-mse", "t-prime-low", "all-layers"]   # judged against the fair control by HELPS_RULE


def selected_ablations(ablations):
    """[(row, key, label, flags)] of the asked ablations: True (all), a list of keys, or False/None (none)."""
    if not ablations:
        return []
    return [(20 + i, k, label, v) for i, (k, label, v) in enumerate(ABLATIONS) if ablations is True or k in ablations]


def variant_judgements(verdicts):
    """HELPS_RULE applied to the pooled verdicts of each variant (VARIANTS) against row 2: [{row, key, helps, wins,
    worse, verdict}], wins the primary measures it won by the rule, worse the diversity measures it lost."""
    out = []
    for v in verdicts:
        if v["b"] != 2 or v["a"] < 20 or ABLATIONS[v["a"] - 20][0] not in VARIANTS:
            continue
        won = lambda m: (m in v and v[m]["verdict"] == f"row {v['a']} better" and v[m]["held"] >= math.ceil(0.8 *
                                                                                                       v[m]["seeds"]))
        wins = [m for m in PRIMARY if won(m)]
        worse = [m for m in ("recall", "coverage") if m in v and v[m]["verdict"] == "row 2 better"]
        helps = bool(wins) and not worse
        out.append({"row": v["a"], "key": ABLATIONS[v["a"] - 20][0], "helps": helps, "wins": wins, "worse": worse,
                    "verdict": "helps" if helps else "does not help by the rule" + (
                        f" (won {', '.join(wins)} but lost {', '.join(worse)})" if wins else "")})
    return out


SWEEP_RESAMPLES = 200    # the guidance sweeps' bootstrap, for the trade-off picture's intervals (rows: the preset's)
BOOKKEEPING_KEYS = {"log_every", "sample_every", "ckpt_every", "resume", "out", "device", "compile"}  # not the result


def run_stage(cfg, log, origin=None):
    """train(cfg), which continues a run of this configuration in cfg["out"] (an interrupted one resumes, a finished
    one is reused: rerunning reproduce, or adding --ablations, never retrains a finished stage) and refuses a folder
    that holds another run. A stage whose origin (the --init weights' step and hash, as train records it) is not
    `origin`, the weights its --init holds now, is stale (a stage 1 continued in place makes every stage 2 on it
    so): its folder is moved aside, never overwritten, the log says where, and the stage is trained anew.
    origin: that of the --init weights (origin_of), from the stage-1 model the caller holds."""
    cfg = {**TRAIN_DEFAULTS, **cfg}
    path = os.path.join(cfg["out"], "ckpt.pt")
    if os.path.isfile(path):
        was = load_checkpoint(path).get("origin")
        if was != origin:
            aside = next(f"{cfg['out']}.stale{i}" for i in range(1, 10 ** 6) if not os.path.exists(f"{cfg['out']}.stale{i}"))
            os.replace(cfg["out"], aside)
            was = was or {"init_steps": "?", "init_hash": "not recorded"}
            log(f"moved {cfg['out']} aside to {aside}: it started from stage-1 weights at step {was['init_steps']} "
                f"(hash {was['init_hash']}), but {cfg['init']} is now at step {origin['init_steps']} (hash "
                f"{origin['init_hash']}); training it anew")
    model, stats = train(cfg, log=log)
    if stats["stopped"]:                                           # a stopped stage is not a finished one: go no further
        raise KeyboardInterrupt
    return model, stats


def preset_settings(preset, overrides, **run):
    """The preset's settings with the given (non-None) overrides, `train` ones and the run's own (seed, device)
    merged into the preset's training flags: checked here, once, before any work."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None and k != "train"}}
    if p.get("fid_protocol", "heldout") not in ("heldout", "standard"):
        raise UsageError(f"--fid-protocol must be heldout or standard, got {p['fid_protocol']!r}")
    if p.get("fid_protocol") == "standard" and p["features"] != "fid":
        raise UsageError("--fid-protocol standard measures FID in pytorch-fid's Inception features: it needs a preset "
                         "whose first ruler is fid (cifar10, cifar10-quick)")
    p.setdefault("fid_n", 50_000)
    for flag in ("stage1_steps", "cooldown"):
        if p["stage1"] == "shipped" and overrides.get(flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} shapes a trained stage 1; the shipped one is used: add "
                             "--stage1 train")
    p["train"] = {**p["train"], **{k: v for k, v in (overrides.get("train") or {}).items() if v is not None and v is not False},
                  **run}
    check_flags({**TRAIN_DEFAULTS, **p["train"]})
    if p["stage1"] == "train":                                     # its cool-down to the stage-2 rate, its guide
        try:
            check_flags({**TRAIN_DEFAULTS, **p["train"], **stage1_settings(p)})
        except UsageError as e:
            raise UsageError(f"stage 1 of --preset {preset} (cooled down to its stage-2 lr {p['stage2_lr']:g}): {e}")
    return p


def stage1_settings(p):
    """Stage 1's own flags: MSE for the preset's stage-1 steps, cooled down to stage 2's rate, with the EMA at 1/8
    of its steps saved as the autoguidance guide."""
    return dict(loss="mse", steps=p["stage1_steps"], cooldown=p["cooldown"], final_lr=p["stage2_lr"],
                guide_at=max(1, p["stage1_steps"] // 8))


def shipped_stage1(base):
    """The shipped stage-1 checkpoint (its sha256 checked), if the run asks for its data and model: else one line."""
    ckpt = load_checkpoint(PRETRAINED["mse"])
    want = {**TRAIN_DEFAULTS, **base}
    other = [f"--{k.replace('_', '-')} {want[k]} (shipped: {ckpt['config'][k]})" for k in SHIPPED_KEYS
             if ckpt["config"].get(k) != want[k]]
    if other:
        raise UsageError(f"the shipped stage 1 has another data set or model than this run asks for: {'; '.join(other)}."
                         " Add --stage1 train to train a stage 1 for it")
    return ckpt


def plan(p, out, stage1_dir, stage1_seed=None, ablations=False):
    """What a run of preset settings p trains: (stage-1 checkpoint, its guide, [(key, stage flags with their
    folder)]): stage 1 (unless shipped), stage 2 and the control from it, the ablations if asked."""
    shipped = p["stage1"] == "shipped"
    stage1, guide = ((PRETRAINED["mse"], PRETRAINED["guide"]) if shipped else
                     (os.path.join(stage1_dir, "ckpt.pt"), os.path.join(stage1_dir, "guide.pt")))
    s2 = dict(steps=p["stage2_steps"], lr=p["stage2_lr"], init=stage1)
    stages = ([] if shipped else [("mse", {**stage1_settings(p), "out": stage1_dir,
                                           **({} if stage1_seed is None else {"seed": stage1_seed})})])
    stages += [(key, {"loss": loss, **s2, **variant, "out": os.path.join(out, key)}) for key, loss, variant in
               [("self-perceptual", "self-perceptual", {}), ("mse-continued", "mse", {})] +
               [(f"sp-{k}", "self-perceptual", v) for _, k, _, v in selected_ablations(ablations)]]
    return stage1, guide, stages


def flag_text(k, v):
    """One command-line flag for key k set to v: a switch alone when v is True, a list comma-separated, the value
    shell-quoted."""
    v = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")


def train_flags(cfg, skip=()):
    """The `train` flags that give cfg, except the keys in `skip`: every value that differs from TRAIN_DEFAULTS."""
    return " ".join(flag_text(k, v) for k, v in cfg.items()
                    if k in TRAIN_DEFAULTS and k not in skip and v != TRAIN_DEFAULTS[k] and v is not False)


def print_commands(preset, nproc, out, seed=0, device=None, ablations=False, log=print, nnodes=1, rdzv_endpoint="",
                   **overrides):
    """The multi-GPU route, from the preset itself: the exact torchrun command of each training stage (data
    parallel on nproc ranks per node, on nnodes nodes that meet at rdzv_endpoint; rank 0 prepares the data and
    writes the checkpoints), then the reproduce command that finds them finished, reuses them and evaluates every
    row in one process. Each stage command is safe to run again: it continues its run, or leaves it finished.
    Several nodes need --out (and the data folder) on a filesystem they share: every rank reads the checkpoint."""
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address where the nodes meet")
    p = preset_settings(preset, overrides, seed=seed, device=device or TRAIN_DEFAULTS["device"])
    if p["stage1"] == "shipped":
        shipped_stage1(p["train"])
    if p["features"] == "fid" and not importlib.util.find_spec("pytorch_fid"):
        log("# note: the evaluation (the last command) needs pytorch-fid and its weights: pip install pytorch-fid")
    _, _, stages = plan(p, out, os.path.join(out, "mse"), ablations=ablations)
    launch = (f"torchrun --standalone --nproc_per_node={nproc}" if nnodes == 1 else
              f"torchrun --nnodes={nnodes} --nproc_per_node={nproc} --rdzv_backend=c10d "
              f"--rdzv_endpoint={rdzv_endpoint} --rdzv_id=perceptual-diffusion")
    lines = [f"{launch} perceptual_diffusion.py train " + train_flags({**TRAIN_DEFAULTS, **p["train"], **stage})
             for _, stage in stages]
    again = {"preset": preset, "out": out, "seed": seed, **{k: v for k, v in overrides.items() if k != "train"},
             **(overrides.get("train") or {}), "device": device, "ablations": ablations}
    lines.append("python reproduce.py reproduce " + " ".join(flag_text(k, v) for k, v in again.items()
                                                          if v is not None and v is not False))
    for line in lines:
        log(line)
    return lines


def reproduce(preset="cpu", out="runs/reproduce", device=None, seed=0, log=print, ablations=False, stage1_out=None,
              stage1_seed=None, **overrides):
    """Stage 1 (MSE, cooled down to stage 2's rate, saving an early EMA snapshot as the autoguidance guide; or,
    where the preset says stage1="shipped", the shipped pretrained model and its guide, as the paper fine-tunes a
    pretrained model), stage 2 (self-perceptual from stage 1), and the fair control (MSE continued for as many
    steps as stage 2) from the same stage-1 weights; then the rows of ROWS, each sampled with the same sampler,
    seeds, initial noise and number of samples, and measured with the same two rulers; the paired verdicts of
    PAIRS; the x0_hat study; with fid_protocol="standard", the literature's FID of rows 1-4. With ablations, one
    more stage-2 run per entry of ABLATIONS. stage1_out, stage1_seed: the folder and seed of a shared stage 1
    (default: out, seed). Writes results.md, results.json, comparison.png, x0_hat.png, guidance_tradeoff.png
    (and ablations.md, .json) under `out`. Every verdict here rests on one training run of each stage: see
    reproduce_seeds for verdicts over seeds."""
    if distributed()[1] > 1:
        raise UsageError("reproduce runs in one process; under torchrun, run the `train` stages instead")
    p = preset_settings(preset, overrides, seed=seed, device=device or TRAIN_DEFAULTS["device"])
    base = p["train"]
    writable_dir(out, "--out")
    shipped = shipped_stage1(base) if p["stage1"] == "shipped" else None   # checked before any work
    t_start = time.time()
    stage1_dir = os.path.join(stage1_out or out, "mse")
    stage1, guide_path, stages = plan(p, out, stage1_dir, stage1_seed, ablations)
    # Everything the evaluation needs (the classifier ruler, or pytorch-fid, its weights and the reference statistics)
    # is built before any training: a missing package or an offline GPU node is one line now, not after hours.
    d, dev = shipped["config"] if shipped else {**TRAIN_DEFAULTS, **base}, torch.device(base["device"])
    log("== the rulers, before any training ==")
    ruler = Ruler(p["features"], d["data"], d["data_dir"], d["image_size"], d["data_seed"], p["real_n"], dev,
                  classifier_steps=p["classifier_steps"], log=log)
    models, stats, origin = {}, {}, None
    if shipped:
        log(f"== stage 1: the shipped model {stage1} ({shipped['total_steps']} steps; no training) ==")
        models["mse"] = model_from_checkpoint(shipped).to(base["device"]).eval()
        stats["mse"] = {"config": shipped["config"], "total_steps": shipped["total_steps"], "reused": True,
                        "train_seconds": shipped.get("train_seconds", 0.0)}
        origin = origin_of(shipped)                                # what train records for --init
    for i, (key, stage) in enumerate(stages):
        log(f"== stage {i + 1}/{len(stages)}: {key} ({stage['steps']} steps) ==")
        models[key], stats[key] = run_stage({**base, **stage}, log=lambda s, k=key: log(f"[{k}] {s}"), origin=origin)
        models[key].eval()
        if key == "mse":                                           # what every stage 2 starts from
            origin = {"init_steps": stats[key]["total_steps"], "init_hash": weights_hash(models[key].state_dict())}
    cfg = stats["mse"]["config"]
    if not os.path.isfile(guide_path):
        raise UsageError(f"{stage1_dir} holds a stage 1 without guide.pt (trained before autoguidance): remove that "
                         "folder or use another --out")
    guide = model_from_checkpoint(load_checkpoint(guide_path)).to(base["device"]).eval()
    schedule = schedule_from(cfg)
    ev = dict(steps=p["eval_steps"], precision=cfg["precision"], resamples=p["resamples"])
    notes = []
    if ruler.real_n < p["eval_n"]:
        notes.append(f"The held-out set has {ruler.real_n} images, fewer than the {p['eval_n']} samples per row: "
                     f"precision, recall, density and coverage use {ruler.real_n} of each, and each Frechet distance "
                     f"compares {p['eval_n']} samples with {ruler.real_n} real images. At this n a Frechet distance "
                     "is dominated by its bias: its paired differences can still order rows, but its values are not "
                     "comparable with distances measured at another n (KID is unbiased).")
        log("note: " + notes[-1])

    # Small sweeps, on another seed and fewer samples than the table uses: classifier-free guidance of the MSE model
    # (row 3's w) and of the self-perceptual model, w = 1 included (the trade-off curve); autoguidance with the null
    # label (the label-free rival; its w serves rows 9 and 10). w is chosen by the first ruler's Frechet distance.
    sweeps, guidance = {}, {}
    for kind, key, phi, label, scales in (("cfg", "mse", p["cfg_rescale"], None, [1.0] + p["sweep_scales"]),
                                          ("cfg-sp", "self-perceptual", p["cfg_rescale"], None, [1.0] + p["sweep_scales"]),
                                          ("auto", "mse", 0.0, models["mse"].num_classes, p["sweep_scales"])):
        sweeps[kind] = []
        for w in scales:
            r, _ = evaluate_model(models[key], schedule, ruler, p["sweep_n"], cfg_scale=w, cfg_rescale=phi,
                                  seed=seed + 1, label=label, guide=guide if kind == "auto" else None,
                                  resamples=SWEEP_RESAMPLES,
                                  **{k: v for k, v in ev.items() if k != "resamples"})
            sweeps[kind].append({"cfg_scale": w, "cfg_rescale": phi, **{k: r[k] for k in SWEEP_KEYS if k in r},
                                 **{k + "_ci": r[k + "_ci"] for k in SWEEP_KEYS if k in r}})
            log(f"{kind} guidance sweep: w={w:g} phi={phi:g} -> Frechet distance {r['fd']:.3f}, precision "
                f"{r['precision']:.3f}, recall {r['recall']:.3f}")
        guidance[kind] = (min((r for r in sweeps[kind] if r["cfg_scale"] != 1), key=lambda r: r["fd"])["cfg_scale"], phi)

    # Each guided row takes the w of its own model's sweep: row 3 (and the picture's MSE column) the MSE sweep's,
    # row 5 the self-perceptual sweep's, rows 9 and 10 the autoguidance sweep's.
    guided = {row: guidance["cfg-sp" if (key, mode) == ("self-perceptual", "cfg") else mode.split("-")[0]]
              for row, _, key, mode in ROWS if mode.startswith(("cfg", "auto"))}

    todo, t_rows = len(ROWS) + len(selected_ablations(ablations)), time.time()

    def evaluate_row(row, name, key, mode):
        """One row: the model sampled as `mode` from the table's seed, with its provenance; logs the progress."""
        w, phi = guided[row] if row in guided else (1.0, 0.0)
        label = models[key].num_classes if mode.endswith("null") else None
        r, boot = evaluate_model(models[key], schedule, ruler, p["eval_n"], cfg_scale=w, cfg_rescale=phi, seed=seed,
                                 label=label, guide=guide if mode.startswith("auto") else None, **ev)
        r.update(row=row, name=name, model=key, mode=mode, loss=stats[key]["config"]["loss"],
                 train_steps=stats[key]["total_steps"], train_seconds=round(stats[key]["train_seconds"], 1))
        done = len(rows) + 1
        log(f"row {row} {name}: Frechet distance {r['fd']:.3f} {fmt_ci(r['fd_ci'])} ({r['fd_protocol']}), random "
            f"features {r['fd_random']:.3f} {fmt_ci(r['fd_random_ci'])} | {done} of {todo} rows, "
            f"{done * p['eval_n']:,} of {todo * p['eval_n']:,} samples, "
            f"{(time.time() - t_rows) / done * (todo - done) / 60:.1f} min left")
        return r, boot

    rows, boots = {}, {}
    for spec in ROWS:
        rows[spec[0]], boots[spec[0]] = evaluate_row(*spec)
    verdicts = [verdict(a, b, what, rows, boots) for a, b, what in PAIRS]
    fid = {}
    if p.get("fid_protocol") == "standard":                        # the literature's FID for rows 1-4
        for row, name, key, mode in ROWS[:4]:
            w, phi = guided.get(row, (1.0, 0.0))
            fid[row] = standard_fid(models[key], schedule, ruler, p["fid_n"], p["eval_steps"], w, phi, seed + 2,
                                    cfg["precision"], log=lambda s, r=row: log(f"row {r} {s}"))
            log(f"row {row} {name}: FID {fid[row]:.2f} ({STANDARD_FID.format(n=p['fid_n'])})")
    comparison_picture(models, schedule, [r for r in ROWS if r[3] in ("cond", "cfg")], guided,
                       os.path.join(out, "comparison.png"), p["picture_per_class"], p["eval_steps"], cfg["precision"],
                       ruler.class_names)
    x0_numbers, x0_images = x0_hat_study({"MSE": models["mse"], "self-perceptual": models["self-perceptual"]}, schedule, ruler,
                              p["x0_n"], p["x0_show"], os.path.join(out, "x0_hat.png"), cfg["precision"], seed,
                              p["resamples"])
    result = {"preset": preset, "settings": {k: v for k, v in p.items() if k != "train"}, "train": base,
              "stage1": stage1, "guide": guide_path, "stage1_source": "shipped" if shipped else "trained",
              "guidance_sweep": sweeps["cfg"], "guidance": list(guidance["cfg"]), "autoguidance_sweep": sweeps["auto"],
              "autoguidance": list(guidance["auto"]), "sp_guidance_sweep": sweeps["cfg-sp"],
              "sp_guidance": list(guidance["cfg-sp"]),
              "prdc_ceiling": ruler.prdc_ceiling(p["eval_n"]), "sweep_prdc_ceiling": ruler.prdc_ceiling(p["sweep_n"]),
              "rows": list(rows.values()), "verdicts": verdicts,
              "x0_hat": x0_numbers, "x0_hat_images": x0_images, "real": ruler.real_values, "protocol": ruler.protocol,
              "notes": notes, "standard_fid": fid, "standard_fid_protocol": STANDARD_FID.format(n=p.get("fid_n", 0)) if fid else None,
              "stage_hashes": {k: weights_hash(models[k].state_dict()) for k in models},
              "reused_stages": [k for k in stats if stats[k].get("reused")],
              "device": str(dev), "torch_threads": torch.get_num_threads()}
    if ablations:
        abl = []
        for row, key, label, variant in selected_ablations(ablations):
            r, boots[row] = evaluate_row(row, label, f"sp-{key}", "cond")
            r["variant"], rows[row] = variant, r
            r["sp_lambda_value"] = stats[f"sp-{key}"]["config"].get("sp_lambda_value")
            abl.append({"key": key, "ablation": r, "verdicts": [verdict(row, b, what, rows, boots) for b, what in
                                                                ((4, "against the paper's choice (row 4)"),
                                                                 (2, "against MSE trained as long (row 2)"))]})
        result["ablations"] = abl
    tradeoff_picture(result, os.path.join(out, "guidance_tradeoff.png"))
    result["loss_curves"] = loss_curves_picture({key: stage["out"] for key, stage in stages},
                                                os.path.join(out, "loss_curves.png"))
    result["wall_seconds"] = round(time.time() - t_start, 1)
    write_outputs(out, {"results.json": json.dumps(result, indent=1), "results.md": results_markdown(result)}, log)
    if ablations:
        write_outputs(out, {"ablations.json": json.dumps(result["ablations"], indent=1),
                            "ablations.md": ablations_markdown(result)}, log)
    log(f"wrote {out}/results.md, results.json, comparison.png, x0_hat.png, guidance_tradeoff.png, loss_curves.png "
        f"in {result['wall_seconds'] / 60:.1f} min")
    return result


def reproduce_seeds(preset, out, seeds, stage2_seeds=0, device=None, log=print, ablations=False, stage1_root=None,
                    **overrides):
    """The comparison as a claim about the method: the whole pipeline once per training seed, each in out/seedS
    (a finished seed is reused, an interrupted one resumed), then verdicts pooled over the seeds (pooled_verdicts).
    stage2_seeds = J > 0 adds J runs that share seed 0's stage 1 (out/seed0) with their own stage-2, control and
    sampling seeds (1000 + j, or above the largest training seed), so that the spread between seeds splits into its sources (variance_sources).
    stage1_root: where each seed's stage 1 lives (stage1_root/seedS; default: in its own folder), so that runs that
    differ only after stage 1 (the length sweep) share it. Writes pooled.md and pooled.json under `out`."""
    shipped = preset_settings(preset, overrides)["stage1"] == "shipped"
    if shipped and stage2_seeds:
        raise UsageError("--stage2-seeds: with the shipped stage 1 every seed already shares one stage 1 (add "
                         "--stage1 train to split the spread between stage-1 and stage-2 seeds)")
    writable_dir(out, "--out")
    runs, results = seed_runs(out, seeds, stage2_seeds, stage1_root), {}
    for name, seed, stage1_out, stage1_seed in runs:
        sub = os.path.join(out, name)
        prior = finished_result(sub, preset, seed, overrides, ablations)
        if prior:
            log(f"== {name}: reusing its finished results ==")
            results[name] = prior
            continue
        log(f"== {name} ({len(results) + 1} of {len(runs)}) ==")
        results[name] = reproduce(preset, sub, device, seed, lambda s, n=name: log(f"[{n}] {s}"), ablations,
                                  stage1_out, stage1_seed, **overrides)
    full = [results[f"seed{s}"] for s in seeds]
    shared = [full[0]] + [r for n, r in results.items() if "-stage2-" in n]
    pooled = pooled_result(full, shared if stage2_seeds else None)
    write_outputs(out, {"pooled.json": json.dumps(pooled, indent=1), "pooled.md": pooled_markdown(pooled)}, log)
    log(f"wrote {out}/pooled.md and pooled.json ({len(seeds)} full-pipeline seeds)")
    return pooled


def pooled_result(full, shared=None):
    """The pooled result of full-pipeline seeds' results (and, for the split of the spread into its sources, of the
    runs that share the first seed's stage 1: that seed's result first)."""
    rulers = {r["protocol"].get("ruler_hash") for r in full} - {None}      # results written before it: not known
    if len(rulers) > 1:
        raise UsageError(f"the seeds were measured with different classifier rulers ({', '.join(sorted(rulers))}): "
                         "they do not pool; measure every seed with one ruler (pretrained/ ships the default data's)")
    rows = pooled_rows(full)
    pooled = {"preset": full[0]["preset"], "ruler": full[0]["protocol"].get("ruler"),
              "ruler_hash": next(iter(rulers), None), "seeds": [r["train"]["seed"] for r in full],
              "stage2_seeds": len(shared) - 1 if shared else 0, "stage1_source": full[0]["stage1_source"],
              "samples_per_row": full[0]["rows"][0]["samples"], "verdicts": pooled_verdicts(full), "rows": rows,
              "sources": variance_sources(rows, pooled_rows(shared)) if shared else None,
              "stage2_steps": full[0]["settings"]["stage2_steps"]}
    pooled["variant_judgements"] = variant_judgements(pooled["verdicts"])
    return pooled


def pool_folder(folder, log=print):
    """Pool results that were kept as files, so that seeds run in different sessions (or on other machines) pool
    like seeds of one run: folder/seedS.json (each a seed's results.json, S its training seed) -> folder/pooled.json
    and pooled.md, written in place; a folder of stepsL/ folders (a length sweep) -> each pooled, then lengths.md,
    lengths.json, stage2_length.png. The seeds must be distinct, share the preset and every setting but the seed,
    and have been measured with one ruler (pooled_result); a stage 1 trained per seed must differ between them.
    Files it does not pool (runs on a shared stage 1, anything else) are named. Returns the result or summary."""
    if not os.path.isdir(folder):
        raise UsageError(f"pool: {folder!r} is not a folder")
    entries = sorted(os.listdir(folder))
    lengths = sorted(int(d[5:]) for d in entries if d.startswith("steps") and d[5:].isdigit())
    names = sorted((int(f[4:-5]), f) for f in entries if f.startswith("seed") and f.endswith(".json")
                   and f[4:-5].isdigit())
    if lengths and names:
        raise UsageError(f"pool: {folder!r} holds both seedS.json files and stepsL/ folders: pool each on its own")
    if lengths:
        return write_length_summary(folder, {L: pool_folder(os.path.join(folder, f"steps{L}"), log) for L in lengths},
                                    log)
    if not names:
        raise UsageError(f"pool: {folder!r} holds neither seedS.json result files nor stepsL/ folders of them")
    left = [f for f in entries if f.endswith(".json") and f not in {n for _, n in names} and f != "pooled.json"]
    if left:
        log(f"pool: not pooled (not a full-pipeline seed's seedS.json): {', '.join(left)}")
    full = []
    for seed, f in names:
        try:
            with open(os.path.join(folder, f)) as fh:
                r = json.load(fh)
            first = full[0] if full else r
            other = [k for k in ("preset",) if r[k] != first[k]] + [
                f"settings.{k}" for k in sorted(set(r["settings"]) | set(first["settings"]))
                if r["settings"].get(k) != first["settings"].get(k)] + [
                k for k in sorted(set(r["train"]) | set(first["train"])) if k != "seed"
                and r["train"].get(k) != first["train"].get(k)]
            misnamed = r["train"]["seed"] != seed
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"pool: cannot read {os.path.join(folder, f)} as a seed's results ({type(e).__name__})")
        if misnamed:
            raise UsageError(f"pool: {f} holds the results of training seed {r['train']['seed']}, not {seed}")
        if other:
            raise UsageError(f"pool: {f} was run with another {', '.join(other)} than {names[0][1]}: it does not pool")
        full.append(r)
    stage1 = [r["stage_hashes"].get("mse") for r in full if r.get("stage1_source") == "trained"]
    if len(set(stage1)) < len(stage1):
        raise UsageError("pool: two seeds hold the same trained stage 1: they are not independent training runs")
    try:
        pooled = pooled_result(full)
    except (KeyError, TypeError, IndexError) as e:                 # a file of another shape than results.json
        raise UsageError(f"pool: the files in {folder!r} are not all a seed's results ({type(e).__name__}: {e})")
    write_outputs(folder, {"pooled.json": json.dumps(pooled, indent=1), "pooled.md": pooled_markdown(pooled)}, log)
    log(f"wrote {folder}/pooled.md and pooled.json ({len(full)} seeds: {', '.join(f for _, f in names)})")
    return pooled


def reproduce_lengths(preset, out, lengths, seeds, device=None, log=print, ablations=False, **overrides):
    """The stage-2 length sweep: reproduce_seeds once per stage-2 length (the self-perceptual stage and its control
    alike), each in out/stepsL, every length fine-tuning the same stage 1 of each seed (out/stage1/seedS, trained
    once where the preset trains one); then lengths.md, lengths.json and stage2_length.png (length_summary)."""
    writable_dir(out, "--out")
    per = {}
    for steps in lengths:
        log(f"=== stage-2 length {steps} ({lengths.index(steps) + 1} of {len(lengths)}) ===")
        per[steps] = reproduce_seeds(preset, os.path.join(out, f"steps{steps}"), seeds, 0, device,
                                     lambda s, L=steps: log(f"[steps{L}] {s}"), ablations,
                                     stage1_root=os.path.join(out, "stage1"), **{**overrides, "stage2_steps": steps})
    return write_length_summary(out, per, log)


def write_length_summary(out, per, log):
    """lengths.md, lengths.json and stage2_length.png of {stage-2 steps: pooled result} (length_summary)."""
    summary = length_summary(per)
    length_picture(summary, os.path.join(out, "stage2_length.png"))
    write_outputs(out, {"lengths.json": json.dumps(summary, indent=1), "lengths.md": lengths_markdown(summary)}, log)
    log(f"wrote {out}/lengths.md, lengths.json and stage2_length.png ({len(per)} lengths, seeds "
        + "; ".join(f"{L}: {len(p['seeds'])}" for L, p in per.items()) + ")")
    return summary


def seed_runs(out, seeds, stage2_seeds, stage1_root=None):
    """(folder name, seed, stage-1 folder, stage-1 seed) of each run of reproduce_seeds: one full pipeline per
    training seed (its stage 1 under stage1_root/seedS where given), then J runs on the first seed's stage 1 whose
    seeds never repeat a training seed."""
    first, home = max([999, *seeds]) + 1, lambda s: os.path.join(stage1_root or out, f"seed{s}")
    return [(f"seed{s}", s, home(s) if stage1_root else None, s if stage1_root else None) for s in seeds] + [
        (f"seed{seeds[0]}-stage2-{first + j}", first + j, home(seeds[0]), seeds[0]) for j in range(stage2_seeds)]


def finished_result(sub, preset, seed, overrides, ablations=False):
    """The results.json in `sub` if it was written by this preset, seed and settings, from the weights that are
    in its stage folders now, with the ablations if they are asked for; else None (the seed is then run, reusing
    whatever stages still match)."""
    try:
        with open(os.path.join(sub, "results.json")) as f:
            res = json.load(f)
        p = preset_settings(preset, overrides)
        same = (res["preset"] == preset and res["train"]["seed"] == seed and
                res["settings"] == json.loads(json.dumps({k: v for k, v in p.items() if k != "train"})) and
                all(res["train"][k] == v for k, v in p["train"].items()))
        hashes = {k: weights_hash(load_checkpoint(res["stage1"] if k == "mse" else os.path.join(sub, k, "ckpt.pt"))["ema"])
                  for k in res["stage_hashes"]}
        present = {a["ablation"]["model"][3:] for a in res.get("ablations", [])}
        asked = {k for _, k, _, _ in selected_ablations(ablations)}
        return res if same and hashes == res["stage_hashes"] and asked <= present else None
    except (OSError, ValueError, KeyError, UsageError):
        return None
