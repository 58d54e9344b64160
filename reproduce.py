"""The experiment beside perceptual_diffusion.py (the method): the command line of the measuring apparatus and of
the paper's comparison. What it runs lives in experiment/, one module per responsibility:
  comparison.py  the comparison's definition (PRESETS, ROWS, PAIRS, ABLATIONS), the pipeline, seeds, lengths
  rulers.py      feature networks, pixel statistics, the Ruler, evaluation of a model's samples, standard FID
  metrics.py     Frechet distance, KID, precision/recall/density/coverage and their resampled forms
  stats.py       bootstrap intervals, paired verdicts, verdicts pooled over seeds
  report.py      markdown tables and pictures
  tools.py       pretrain, bench (where the time goes), the cost of a run (--estimate), gpucheck

Run (the built-in `shapes` data needs no network):
  python reproduce.py                                    # = reproduce --preset cpu: fine-tunes the shipped stage 1
  python reproduce.py reproduce --seeds 5                # verdicts about fine-tuning it, pooled over 5 seeds
  python reproduce.py reproduce --preset cpu-long --seeds 5   # about the method: each seed trains its own stage 1
  python reproduce.py reproduce --ablations              # + the paper's ablations (reuses finished stages)
  python reproduce.py reproduce --data FOLDER --stage1 train --estimate   # your data (class subfolders); cost first
  python reproduce.py reproduce --preset cifar10-quick --estimate        # FLOPs counted, GPU hours projected
  python reproduce.py reproduce --preset cifar10-quick --print-commands 8   # the torchrun command of each stage
  python reproduce.py evaluate --ckpt runs/sp/ckpt.pt --n 1000
  python reproduce.py pool results/stage2_length             # pooled tables again from the kept seedS.json files
  python reproduce.py pretrain                           # regenerate pretrained/ (72 min of training on one core)
  python reproduce.py bench                              # parameters, training and sampling images/s of the model flags
  python reproduce.py gpucheck                           # every GPU path, timed; each GPU preset's hours
"""
import argparse
import json
import sys

import torch

from experiment.comparison import (ABLATIONS, PRESETS, PRETRAINED_DIR, REPRODUCE_TRAIN_ARGS, pool_folder, print_commands,
                                   reproduce, reproduce_lengths, reproduce_seeds)
from experiment.rulers import CLASSIFIER_STEPS, Ruler, evaluate_model
from experiment.tools import bench, estimate, gpu_check, pretrain
from perceptual_diffusion import (ANY_INT, DEVICE, NONNEG_INT, POS_INT, Parser, TRAIN_DEFAULTS, UNIT, UsageError,
                                  add_sampling_args, add_train_args, load_for_sampling, ranged, run_command,
                                  schedule_from, writable_file)


def at_least(k):
    """An integer >= k (a covariance needs at least 2 samples)."""
    return ranged(int, lambda v: v >= k, f"an integer >= {k}")


def steps_list(text):
    """'N' or 'N1,N2,...': distinct positive step counts, ascending."""
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise argparse.ArgumentTypeError(f"must be a positive integer or distinct ones such as 600,2500, got {text!r}")
    return sorted(steps)


def ablation_list(text):
    """'all' (True) or ablation keys, comma-separated (a list)."""
    keys = [k for k, _, _ in ABLATIONS]
    asked = [k.strip() for k in text.split(",") if k.strip()]
    if text == "all":
        return True
    if not asked or any(k not in keys for k in asked):
        raise argparse.ArgumentTypeError(f"must be all or some of {', '.join(keys)} (comma-separated), got {text!r}")
    return asked


def seeds_arg(text):
    """'K' (seeds 0..K-1, K >= 1) or 'S1,S2,...' (distinct integers; one seed S alone: 'S,'): the training seeds
    of reproduce --seeds."""
    try:
        parts = text[:-1].split(",") if text.endswith(",") and text.count(",") == 1 else text.split(",")
        seeds = list(range(int(text))) if "," not in text else [int(v) for v in parts]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be a count K >= 1 or distinct seeds such as 0,3,7 (one seed: 3,), "
                                         f"got {text!r}")
    return seeds


def build_parser():
    """The command line: reproduce, evaluate, pretrain, bench, gpucheck. Every numeric flag's range is its type."""
    parser = Parser(prog="reproduce.py", description=__doc__.split("\n\n")[0].strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    p = sub.add_parser("evaluate", help="Frechet distances, conditional accuracy and pixel statistics of a checkpoint's samples, with 95%% intervals")
    add_sampling_args(p)
    p.add_argument("--n", type=at_least(2), default=1000, help="number of samples (default: 1000)")
    p.add_argument("--label", type=NONNEG_INT, default=None, help="as for sample (num_classes: unconditional)")
    p.add_argument("--features", default="classifier", choices=["classifier", "fid"], help="first feature network: "
                   "classifier (trained here, offline) or fid (standard FID's network: the optional package "
                   "pytorch-fid); the second is always fixed random features")
    p.add_argument("--real-n", type=at_least(2), default=2000, help="real images for the reference statistics (default: 2000)")
    p.add_argument("--classifier-steps", type=POS_INT, default=CLASSIFIER_STEPS, help="training steps of the "
                   f"classifier ruler, cached per data set under the data folder (default: {CLASSIFIER_STEPS}, as reproduce)")
    p.add_argument("--resamples", type=at_least(20), default=1000, help="bootstrap resamples for the 95%% intervals (default: 1000)")
    p.add_argument("--json", default="", help="also write the result, with its protocol, to this JSON file")
    p = sub.add_parser("reproduce", help="the paper's comparison: train both stages, evaluate every row, write tables and pictures")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS), help="cpu (default: fine-tunes the shipped stage "
                   "1), cpu-long (trains its own, <= 60 min on 2 cores), cifar10 (DDPM's recipe, one GPU), cifar10-quick "
                   "(at half width: 1.6 h projected on one GPU), smoke (seconds)")
    p.add_argument("--out", default="runs/reproduce", help="run folder; finished stages in it are reused (default: runs/reproduce)")
    p.add_argument("--device", type=device_arg, default=None, help="device: auto (cuda, else mps, else cpu; a GPU "
                   "preset then refuses a CPU), cpu, cuda or mps (default: auto)")
    p.add_argument("--seed", type=ANY_INT, default=0, help="seed of training and evaluation (default: 0)")
    p.add_argument("--seeds", type=seeds_arg, default=None, metavar="K|S1,S2,..", help="run the whole pipeline once per "
                   "training seed (K: seeds 0..K-1; a list S1,S2; one seed S: S,), each in --out/seedS, and pool the "
                   "verdicts over them (pooled.md)")
    p.add_argument("--stage2-seeds", type=NONNEG_INT, default=0, help="with --seeds: J more runs on the first seed's "
                   "stage 1 with their own stage-2 and sampling seeds, to split the spread into its sources (default: 0)")
    p.add_argument("--cooldown", type=UNIT, default=None, help="override the preset's stage-1 cool-down fraction (0: "
                   "constant learning rate)")
    p.add_argument("--fid-protocol", default=None, choices=["heldout", "standard"], help="heldout: the paired "
                   "comparison only (every preset); standard: also FID of rows 1-4 by the literature's protocol "
                   "(50,000 samples against the training set; the cifar10 presets' default)")
    p.add_argument("--stage1", default=None, choices=["shipped", "train"], help="stage 1: the shipped pretrained "
                   "model (the cpu preset's default: its data and model only) or trained by this run (the other "
                   "presets' default)")
    p.add_argument("--stage1-steps", type=POS_INT, default=None, help="override the preset's stage-1 (MSE) steps")
    p.add_argument("--stage2-steps", type=steps_list, default=None, metavar="N|N1,N2,..", help="override the preset's "
                   "stage-2 steps (and the control's); a list runs the length sweep, each length in --out/stepsN "
                   "with --seeds, and writes lengths.md and stage2_length.png")
    p.add_argument("--eval-n", type=at_least(2), default=None, help="override the preset's samples per row")
    p.add_argument("--ablations", type=ablation_list, nargs="?", const=True, default=False, metavar="NAMES",
                   help="also train and evaluate the ablations of the self-perceptual objective (the paper's and the "
                   f"variants beyond it): all, or some of {','.join(k for k, _, _ in ABLATIONS)}; writes "
                   "ablations.md and ablations.json")
    p.add_argument("--estimate", action="store_true", help="count the FLOPs of each stage and of sampling, time a few "
                   "steps (or project the time of a GPU preset on a CPU) and print the cost; train nothing")
    p.add_argument("--print-commands", type=POS_INT, default=None, metavar="NPROC", help="print the torchrun command "
                   "of each training stage on NPROC GPUs and the reproduce command that then evaluates them; run nothing")
    p.add_argument("--nnodes", type=POS_INT, default=1, help="with --print-commands: the number of nodes (default: 1)")
    p.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT", help="with --print-commands and --nnodes > 1: "
                   "where the nodes meet (torchrun's rendezvous)")
    add_train_args(p, REPRODUCE_TRAIN_ARGS, override=True)
    p = sub.add_parser("pretrain", help="regenerate the shipped stage 1 (pretrained/): train it, store it in fp16 "
                       "with its sha256, measure it")
    p.add_argument("--out", default="runs/pretrain", help="the training run's folder; a finished run is reused "
                   "(default: runs/pretrain)")
    p.add_argument("--dest", default=PRETRAINED_DIR, help="where the shipped files are written (default: pretrained/)")
    p.add_argument("--device", type=DEVICE, default=TRAIN_DEFAULTS["device"], help="device: auto (cuda, else mps, else cpu), cpu, cuda or mps (default: auto)")
    p = sub.add_parser("pool", help="pool seeds kept as files (DIR/seedS.json: each a seed's results.json, from any "
                       "session or machine) into DIR/pooled.md and pooled.json; a DIR of stepsL/ folders: each, then "
                       "the length summary (lengths.md, stage2_length.png)")
    p.add_argument("dir", help="the folder of seedS.json files (such as results/variants600), or of stepsL/ folders "
                   "of them (such as results/stage2_length); pooled.json and pooled.md are written in place")
    p = sub.add_parser("bench", help="parameters, training and sampling images/s for the model flags")
    add_train_args(p, {"image_size", "channels", "channel_mult", "num_res_blocks", "attn_res", "dropout",
                       "batch_size", "device", "precision", "compile"})
    p.add_argument("--iters", type=POS_INT, default=5, help="timed training steps per objective (default: 5)")
    p = sub.add_parser("gpucheck", help="every accelerator path once, timed, in one command; writes a JSON of figures")
    p.add_argument("--device", type=DEVICE, default=TRAIN_DEFAULTS["device"], help="device: auto (cuda, else mps, else cpu), cpu, cuda or mps (default: auto)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: how the test suite runs the check on a CPU")
    p.add_argument("--out", default="gpu_check.json", help="the JSON of figures (default: gpu_check.json)")
    return parser


def run_evaluate(args):
    """`evaluate`: one checkpoint's samples measured with both rulers (outputs checked before any work)."""
    if args.json:
        writable_file(args.json, "--json", [".json"])
    ckpt, model, guide = load_for_sampling(args)
    c = ckpt["config"]
    ruler = Ruler(args.features, c["data"], c["data_dir"], c["image_size"], c["data_seed"], args.real_n,
                  torch.device(args.device), classifier_steps=args.classifier_steps)
    res, _ = evaluate_model(model, schedule_from(c), ruler, args.n, args.steps, args.cfg, args.cfg_rescale, args.eta,
                            args.spacing, args.seed, args.batch, args.precision, args.label, args.resamples,
                            args.cfg_interval, guide)
    res["checkpoint"], res["train_steps"] = args.ckpt, ckpt.get("total_steps", ckpt["step"])
    print(json.dumps(res))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        except OSError as e:
            raise OSError(f"could not write --json {args.json!r} ({e.strerror or e}); the result is the JSON line "
                          f"printed above")


def device_arg(text):
    """--device of reproduce: as DEVICE, but `auto` kept as it is, so that an explicit --device cpu can be told from
    a machine where auto found no GPU."""
    return text if text == "auto" else DEVICE(text)


def run_reproduce(args):
    """`reproduce`: the comparison once, over seeds, or its projected cost (--estimate). A GPU preset refuses to
    train where no GPU is visible unless --device cpu is given (--estimate and --print-commands train nothing)."""
    explicit_cpu = args.device is not None and args.device != "auto" and torch.device(args.device).type == "cpu"
    args.device = None if args.device == "auto" else args.device
    device = args.device or TRAIN_DEFAULTS["device"]
    if (PRESETS[args.preset].get("target") == "gpu" and torch.device(device).type == "cpu" and not explicit_cpu
            and not (args.estimate or args.print_commands)):
        raise UsageError(f"--preset {args.preset} is sized for a GPU and none is visible here (torch "
                         f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}): run it where CUDA is, "
                         "or give --device cpu to train it on this CPU anyway (--estimate projects the time)")
    lengths = args.stage2_steps or [None]
    overrides = dict(fid_protocol=args.fid_protocol, stage1=args.stage1, stage1_steps=args.stage1_steps,
                     stage2_steps=lengths[0], eval_n=args.eval_n, cooldown=args.cooldown,
                     train={k: getattr(args, k) for k in REPRODUCE_TRAIN_ARGS})
    if args.stage2_seeds and not args.seeds:
        raise UsageError("--stage2-seeds needs --seeds")
    if len(lengths) > 1:
        if args.print_commands or args.stage2_seeds:
            raise UsageError("a list of --stage2-steps runs the length sweep: give one length with "
                             f"{'--print-commands' if args.print_commands else '--stage2-seeds'}")
        for i, steps in enumerate(lengths):
            if args.estimate:
                estimate(args.preset, args.device, runs=len(args.seeds or [0]), shared_stage1=i > 0,
                         **{**overrides, "stage2_steps": steps})
        if not args.estimate:
            reproduce_lengths(args.preset, args.out, lengths, args.seeds or [0], args.device, ablations=args.ablations,
                              **overrides)
    elif args.print_commands:
        print_commands(args.preset, args.print_commands, args.out, args.seed, args.device, args.ablations,
                       nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, **overrides)
    elif args.estimate:
        estimate(args.preset, args.device, runs=len(args.seeds or [0]), stage2_runs=args.stage2_seeds, **overrides)
    elif args.seeds:
        reproduce_seeds(args.preset, args.out, args.seeds, args.stage2_seeds, args.device, ablations=args.ablations,
                        **overrides)
    else:
        reproduce(args.preset, args.out, args.device, args.seed, ablations=args.ablations, **overrides)


def run_gpucheck(args):
    """`gpucheck`: exit code 1 if any path failed."""
    writable_file(args.out, "--out", [".json"])
    return 1 if gpu_check(args.device, args.tiny, args.out) else 0


def main(argv=None):
    """Run one command (none, or flags alone: reproduce); each problem is one line (run_command)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["reproduce", *argv]                                # python reproduce.py --out runs/x
    commands = {"evaluate": run_evaluate, "reproduce": run_reproduce, "gpucheck": run_gpucheck,
                "pretrain": lambda args: pretrain(args.out, args.dest, args.device) and None,
                "pool": lambda args: pool_folder(args.dir) and None,
                "bench": lambda args: bench(vars(args), args.iters) and None}
    return run_command(build_parser(), argv, lambda args: commands[args.command](args),
                       "reproduce, evaluate, pool, pretrain, bench or gpucheck")


if __name__ == "__main__":
    sys.exit(main())
