"""The experiment's tools: the machine in words, pretrain (regenerates pretrained/), where the time goes (step
timing, bench), the cost of a run (FLOPs counted, time measured or projected) and gpucheck (every GPU path rehearsed
and timed).
"""
import functools
import hashlib
import importlib.util
import json
import os
import shlex
import sys
import time

import torch

import perceptual_diffusion
from perceptual_diffusion import (TRAIN_DEFAULTS, UNet, autocast, check_flags, frozen_copy, generate, load_checkpoint,
                                  max_forward_batch, model_from_checkpoint, model_kwargs, native_bf16, objective,
                                  save_checkpoint, schedule_from, train, writable_dir)
from .comparison import (ABLATIONS, BOOKKEEPING_KEYS, PRESETS, PRETRAINED, PRETRAINED_DIR, ROWS, preset_settings,
                         print_commands, reproduce, run_stage, stage1_settings, train_flags)
from .report import fmt_ci, write_outputs
from .rulers import Ruler, evaluate_model, standard_fid


def machine():
    """This machine in words: CPU model and vector extensions (they change fp32 results and speed), cores, the
    torch threads, and the GPU if one is used."""
    import platform
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {x}" in info)
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name} ({flags or 'flags unknown'}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}"


PRETRAIN_STEPS, PRETRAIN_EMA = 50_000, 0.9995


def pretrain(out="runs/pretrain", dest=PRETRAINED_DIR, device="cpu", log=print):
    """Regenerate the shipped stage 1: the cpu preset's stage 1 trained PRETRAIN_STEPS steps with EMA PRETRAIN_EMA
    (a finished run in out/mse is reused, an interrupted one resumed); its EMA weights and its guide (the EMA at
    1/8 of the steps) written to `dest` in fp16, each with a sha256 that load_checkpoint checks; and its card
    (shapes16.json): provenance, and the default run's measurement of it (row 1: unguided samples, the classifier
    ruler) for the fp16 weights as shipped and for the fp32 ones they were rounded from."""
    import importlib.metadata as md
    p = preset_settings("cpu", {"stage1": "train", "stage1_steps": PRETRAIN_STEPS, "train": {"ema_decay": PRETRAIN_EMA}},
                        seed=0, device=device)
    cfg = {**TRAIN_DEFAULTS, **p["train"], **stage1_settings(p), "out": os.path.join(out, "mse")}
    writable_dir(dest, "--dest")
    run_stage(cfg, log)
    run = {k: load_checkpoint(os.path.join(out, "mse", f"{k}.pt")) for k in ("ckpt", "guide")}
    flags = train_flags(cfg, BOOKKEEPING_KEYS | {"data_dir"})
    provenance = {"command": "python reproduce.py pretrain", "same as": f"python perceptual_diffusion.py train {flags}",
                  "steps": run["ckpt"]["step"], "guide_step": run["guide"]["step"], "data_seed": cfg["data_seed"],
                  "train_seconds": round(run["ckpt"].get("train_seconds", 0.0)), "machine": machine(),
                  "packages": {m: md.version(m) for m in ("torch", "torchvision", "numpy", "pillow")},
                  "python": sys.version.split()[0], "stored": "EMA weights in fp16 (loaded as fp32)"}
    paths, digests = {k: os.path.join(dest, os.path.basename(PRETRAINED[k])) for k in PRETRAINED}, {}
    for key, c in (("mse", run["ckpt"]), ("guide", run["guide"])):
        save_checkpoint(paths[key], {"config": c["config"], "ema": {k: v.half() for k, v in c["ema"].items()},
                                     "step": c["step"], "total_steps": c.get("total_steps", c["step"]),
                                     "train_seconds": c.get("train_seconds", 0.0), "provenance": provenance})
        name = os.path.basename(paths[key])
        with open(paths[key], "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
        with open(paths[key] + ".sha256", "w") as f:
            f.write(f"{digests[name]}  {name}\n")
    # The shipped model measured exactly as the default run measures its row 1.
    c = run["ckpt"]["config"]
    ruler = Ruler(p["features"], c["data"], c["data_dir"], c["image_size"], c["data_seed"], p["real_n"],
                  torch.device(device), classifier_steps=p["classifier_steps"], log=log)
    measured = {}
    for name, ckpt in (("shipped_fp16", load_checkpoint(paths["mse"])), ("fp32", run["ckpt"])):
        r, _ = evaluate_model(model_from_checkpoint(ckpt).to(device).eval(), schedule_from(c), ruler, p["eval_n"],
                              p["eval_steps"], seed=0, precision=c["precision"], resamples=p["resamples"])
        measured[name] = {k: r[k] for k in ("cond_acc", "cond_acc_ci", "fd", "fd_ci", "fd_random", "fd_random_ci",
                                            "kid", "kid_ci", "precision", "recall", "samples", "steps", "features")}
        log(f"{name}: conditional accuracy {r['cond_acc']:.3f} {fmt_ci(r['cond_acc_ci'])}, Frechet distance "
            f"{r['fd']:.3f} {fmt_ci(r['fd_ci'])} ({p['eval_n']} unguided samples, {p['eval_steps']} steps, seed 0)")
    card = {"provenance": provenance, "files": digests, "measured": measured, "protocol": ruler.protocol}
    write_outputs(dest, {os.path.basename(paths["card"]): json.dumps(card, indent=1)}, log)
    log(f"wrote {paths['mse']}, {paths['guide']} (each with its .sha256) and {paths['card']}")
    return card


def step_times(cfg, iters, sample_steps):
    """Seconds per training step of each objective at cfg's batch, and per sampling call of a batch for
    sample_steps DDIM steps, unguided and guided: after a warm-up (and compilation), on cfg's model and device."""
    cfg = {**TRAIN_DEFAULTS, **cfg, "num_classes": 10}
    check_flags(cfg)
    device, B, S = torch.device(cfg["device"]), cfg["batch_size"], cfg["image_size"]
    torch.manual_seed(0)
    model = UNet(**model_kwargs(cfg)).to(device)
    perceptual_net = frozen_copy(model)
    net = torch.compile(model) if cfg["compile"] else model
    schedule, amp = schedule_from(cfg), autocast(device, cfg["precision"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0, y = torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device)

    first = []

    sync = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}.get(device.type, lambda: None)

    def timed(fn, n):
        t0 = time.time()
        fn()                                                       # warm-up (and compilation)
        sync()
        first.append(time.time() - t0)
        t0 = time.time()
        for _ in range(n):
            fn()
        sync()
        return (time.time() - t0) / n

    def train_step(loss):
        loss_of = objective(loss, net, perceptual_net, schedule)

        def step():
            with amp:
                l = loss_of(x0, y)
            l.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def sampler(w):                                                # as every sampling path: through generate
        return lambda: generate(net, schedule, B, sample_steps, cfg_scale=w, precision=cfg["precision"])

    t = {"mse": timed(train_step("mse"), iters), "self-perceptual": timed(train_step("self-perceptual"), iters)}
    model.eval()
    t.update(unguided=timed(sampler(1.0), 1), guided=timed(sampler(3.0), 1), cfg=cfg, first_step_seconds=first[0],
             params=sum(p.numel() for p in model.parameters()))
    return t


def bench(cfg, iters=5, log=print):
    """Parameter count, training images/s with each objective (and their ratio), and sampling images/s at
    50 DDIM steps without and with guidance."""
    t = step_times(cfg, iters, 50)
    cfg, B = t["cfg"], t["cfg"]["batch_size"]
    res = {"params": t["params"], "device": cfg["device"], "batch": B, "precision": cfg["precision"],
           "threads": torch.get_num_threads(), "train_img_s_mse": B / t["mse"],
           "train_img_s_self_perceptual": B / t["self-perceptual"], "self_perceptual_step_ratio": t["self-perceptual"] / t["mse"],
           "sample_img_s_50_steps": B / t["unguided"], "sample_img_s_50_steps_guided": B / t["guided"],
           "guided_step_ratio": t["guided"] / t["unguided"], "max_forward_batch": max_forward_batch(cfg["device"]),
           "first_step_seconds": t["first_step_seconds"]}
    log(f"model {res['params'] / 1e6:.2f}M parameters | {cfg['device']}, batch {B}, precision {cfg['precision']}, "
        f"{res['threads']} threads")
    for what, key, extra in (("train  mse            ", "train_img_s_mse", ""), ("train  self-perceptual",
                             "train_img_s_self_perceptual", f"(step cost {res['self_perceptual_step_ratio']:.2f}x mse)"),
                             ("sample 50 steps       ", "sample_img_s_50_steps", ""), ("sample 50 steps, cfg  ",
                             "sample_img_s_50_steps_guided", f"(step cost {res['guided_step_ratio']:.2f}x unguided; "
                             f"forwards chunked to {res['max_forward_batch']})")):
        log(f"{what} {res[key]:8.1f} img/s   {extra}".rstrip())
    return res


# Where nothing was measured, time is projected from counted FLOPs at this stated assumption (a GPU's measured
# throughput replaces it: gpucheck).
ASSUMED_FLOP_S, ASSUMPTION = 0.4 * 312e12, "40% of an A100's dense bf16 peak (312 TFLOP/s)"


@functools.lru_cache(maxsize=None)
def _flops(arch):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = {**TRAIN_DEFAULTS, **dict(arch), "num_classes": 10}
    torch.manual_seed(0)
    model = UNet(**model_kwargs(cfg))
    f_star, schedule, B, S = frozen_copy(model), schedule_from(cfg), 2, cfg["image_size"]
    x0, y, out = torch.randn(B, 3, S, S), torch.randint(0, 10, (B,)), {}
    # PITFALL: the counter has no formula for the CPU's fused attention kernel (it would count attention as 0
    # FLOPs); the math kernel computes the same product with matmuls it counts.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for loss in ("mse", "self-perceptual"):
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            objective(loss, model, f_star, schedule)(x0, y).backward()
        out[loss] = fc.get_total_flops() / B
    with torch.no_grad(), FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        model(x0, torch.zeros(B, dtype=torch.long), y)
    return {**out, "forward": fc.get_total_flops() / B, "params": sum(p.numel() for p in model.parameters())}


ARCH_FLAGS = ["image_size", "channels", "channel_mult", "num_res_blocks", "attn_res"]   # what FLOPs depend on


def count_flops(train_cfg):
    """FLOPs per image (2 per multiply-add; torch's FLOP counter, on the CPU at batch 2, seconds even for the
    cifar10 network) of one training step of each objective, forward and backward, and of one sampling forward."""
    return _flops(tuple(sorted((k, train_cfg[k]) for k in ARCH_FLAGS if k in train_cfg)))


def work(p):
    """What a run of preset settings p does, counted: (what, how many, kind) per part; kind mse and
    self-perceptual count training steps of the global batch, forward and guided count sampling image-steps
    (a guided one costs two forwards)."""
    k, S = 10, p["eval_steps"]                                    # classes of shapes and CIFAR-10
    n_unguided, n_guided = sum(m in ("cond", "null") for *_, m in ROWS), sum(m not in ("cond", "null") for *_, m in ROWS)
    unguided = S * ((n_unguided * p["eval_n"] + 2 * p["sweep_n"]) + 3 * p["picture_per_class"] * k) + 12 * p["x0_n"]
    guided = S * (n_guided * p["eval_n"] + 3 * len(p["sweep_scales"]) * p["sweep_n"] + 2 * p["picture_per_class"] * k)
    parts = [("stage 1: the shipped model, not trained", 0, "mse") if p["stage1"] == "shipped" else
             (f"stage 1: mse, {p['stage1_steps']:,} steps", p["stage1_steps"], "mse"),
             (f"stage 2: self-perceptual, {p['stage2_steps']:,} steps", p["stage2_steps"], "self-perceptual"),
             (f"control: mse, {p['stage2_steps']:,} steps", p["stage2_steps"], "mse"),
             (f"evaluation: {unguided:,} image-steps unguided", unguided, "forward"),
             (f"evaluation: {guided:,} image-steps guided", guided, "guided")]
    if p.get("fid_protocol") == "standard":                        # rows 1, 2, 4 unguided and 3 guided
        parts += [(f"standard FID: 3 x {p['fid_n']:,} samples unguided", 3 * p["fid_n"] * S, "forward"),
                  (f"standard FID: {p['fid_n']:,} samples guided", p["fid_n"] * S, "guided")]
    return parts


def unit_flops(p):
    """FLOPs of one unit of each kind of work(p): a training step of the global batch, a sampling image-step."""
    B, fl = p["train"]["batch_size"], count_flops(p["train"])
    return {"mse": B * fl["mse"], "self-perceptual": B * fl["self-perceptual"], "forward": fl["forward"],
            "guided": 2 * fl["forward"]}


def estimate(preset, device=None, log=print, runs=1, stage2_runs=0, shared_stage1=False, **overrides):
    """The cost of `reproduce --preset`, part by part: its FLOPs, counted (count_flops, work), and its time:
    measured from a few timed steps of each objective and of sampling on `device` (random data of the preset's
    shape: nothing is downloaded or trained), except for a GPU preset on a CPU, whose full-size steps would take
    minutes each: its hours are projected from the FLOPs at ASSUMPTION and labelled so. For `runs` full-pipeline
    seeds and `stage2_runs` runs on a shared stage 1. Not included: building the ruler and writing pictures."""
    device = device or TRAIN_DEFAULTS["device"]
    p = preset_settings(preset, overrides, device=device)
    B, fl, flop = p["train"]["batch_size"], count_flops(p["train"]), unit_flops(p)
    timed = not (p.get("target") == "gpu" and torch.device(device).type == "cpu")
    if timed:
        t = step_times(p["train"], iters=3, sample_steps=4)
        sec = {"mse": t["mse"], "self-perceptual": t["self-perceptual"], "forward": t["unguided"] / (4 * B),
               "guided": t["guided"] / (4 * B)}
    else:
        sec = {k: v / ASSUMED_FLOP_S for k, v in flop.items()}
    parts = [(name, n * flop[kind], n * sec[kind]) for name, n, kind in work(p)]
    if shared_stage1:                                              # a later length of the sweep: stage 1 is shared
        parts[0] = ("stage 1: shared with the first length, counted there", 0.0, 0.0)
    if runs > 1 or stage2_runs:
        scale = lambda i: runs + (stage2_runs if i > 0 else 0)
        parts = [(name, f * scale(i), s * scale(i)) for i, (name, f, s) in enumerate(parts)]
        log(f"(x {runs} seeds + {stage2_runs} runs on a shared stage 1, in every line)")
    total_flop, total = sum(f for _, f, _ in parts), sum(s for _, _, s in parts)
    how = (f"measured: 3 training steps per objective at batch {B}, 4 sampling steps, forwards chunked to "
           f"{max_forward_batch(device) or 256}" if timed else f"PROJECTED at {ASSUMPTION}: an assumption, not a "
           "measurement; `python reproduce.py gpucheck` on your GPU measures it")
    log(f"estimate for --preset {preset} on {device} ({fl['params'] / 1e6:.2f}M parameters; time {how})")
    log(f"  FLOPs counted (torch's counter): one training step at batch {B}: mse {flop['mse']:.3g}, self-perceptual "
        f"{flop['self-perceptual']:.3g}; one sampling step: {fl['forward']:.3g} per image (x2 guided)")
    unit, div = ("h", 3600) if total > 5 * 3600 else ("min", 60)
    for name, f, s in parts:
        log(f"  {name:55s} {f:10.3g} FLOP {s / div:9.2f} {unit}")
    log(f"  {'total (without building the ruler)':55s} {total_flop:10.3g} FLOP {total / div:9.2f} {unit}"
        + ("" if timed else " projected")
        + f"   (--ablations adds {len(ABLATIONS)} x {p['stage2_steps'] * sec['self-perceptual'] / div:.2f} {unit} of training)")
    return {"parts": {name: s for name, _, s in parts}, "flops": {name: f for name, f, _ in parts},
            "total_seconds": total, "total_flops": total_flop, "timed": timed, "per_image_flops": fl}


GPUCHECK_PATHS = ["bench_fp32", "bench_bf16", "compile", "train_loop", "stages_and_evaluation", "kill_and_rerun",
                  "ddp_2_ranks", "standard_fid"]   # every path gpucheck rehearses; its JSON names each


def descendants(pid):
    """The process ids below `pid` (Linux's /proc), children first: torchrun starts its ranks in groups of their own."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launch(argv, nproc, log_prefix="", kill_after=None, timeout=600):
    """Run a `perceptual_diffusion.py train` argv under torchrun on nproc ranks (OMP_NUM_THREADS=1 each); with
    kill_after=k, SIGKILL it and its ranks once rank 0 has logged step k. Returns (exit code, stdout, stderr)."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           perceptual_diffusion.__file__, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if kill_after is None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout, r.stderr
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith(f"step {kill_after}/"):
            for pid in descendants(p.pid) + [p.pid]:               # SIGKILL the ranks and torchrun, as a scheduler
                try:                                               # ends a job: no handler, no last checkpoint
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            break
    out, err = p.communicate(timeout=timeout)
    return p.returncode, "".join(seen) + out, err


def gpu_check(device="cuda", tiny=False, out="gpu_check.json", log=print):
    """Every path the cifar10 presets take, rehearsed at a tiny size and timed, in one command (at most a few minutes
    on one GPU; --tiny on a CPU is how the test suite runs it), on the built-in shapes at 32 px (no network):
    bench's figures in fp32, bf16 (where the GPU has native bf16) and compiled; the real training loop (EMA,
    clipping, logging) whose img/s projects each GPU preset's hours; a tiny reproduce (stage 1 MSE, stage 2
    self-perceptual with its frozen copy, the control, the evaluation with every ruler on the device); a stage
    killed with SIGKILL and launched again with its printed torchrun command (it continues from its checkpoint, then
    a third launch leaves the finished run untouched); a self-perceptual stage with --sp-with-mse auto on 2 ranks
    (NCCL with 2 GPUs, gloo on a CPU; one GPU: not exercised); standard FID and the paired rulers in the real
    pytorch-fid network's features where its weights are already on disk (nothing downloads them). Writes one JSON: the figures, and `paths` with each path "ok", "not exercised: why" or
    "FAILED: the error"; returns the failures."""
    import tempfile
    dev = torch.device(device)
    model_keys = ["channels", "channel_mult", "num_res_blocks", "attn_res", "dropout", "batch_size"]
    cfg = {**{k: PRESETS["cifar10"]["train"][k] for k in model_keys}, "image_size": 32, "device": device}
    if tiny:
        cfg.update(channels=8, channel_mult="1,2", num_res_blocks=1, attn_res="", batch_size=4, image_size=8)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    figures, paths, failures = {"device": machine(), "torch": torch.__version__, "config": cfg}, {}, {}

    def part(name, fn, skip=None):
        """Run one path; record its figures, or why it was not exercised, or its failure (every path is tried)."""
        if skip:
            paths[name] = f"not exercised: {skip}"
            log(f"{name}: {paths[name]}")
            return
        t0 = time.time()
        try:
            figures[name] = fn()
            figures.setdefault("seconds", {})[name] = round(time.time() - t0, 1)
            paths[name] = "ok"
            log(f"{name}: {json.dumps(figures[name])} ({time.time() - t0:.0f} s)")
        except Exception as e:
            failures[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            paths[name] = f"FAILED: {failures[name]}"
            log(f"{name}: FAILED {failures[name]}")

    speeds = lambda **kw: bench({**cfg, **kw}, iters=2 if tiny else 20, log=lambda s: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bf16 = dev.type == "cpu" or native_bf16(dev)                  # a CPU emulates it; an older GPU would only emulate
    part("bench_fp32", lambda: speeds(precision="fp32"))
    part("bench_bf16", lambda: speeds(precision="bf16"), None if bf16 else "this GPU has no native bf16")
    part("compile", lambda: speeds(precision="bf16" if bf16 else "fp32", compile=True))
    with tempfile.TemporaryDirectory() as tmp:

        def train_loop():
            steps = 12 if tiny else 200
            train({**cfg, "steps": steps, "log_every": steps // 4, "out": os.path.join(tmp, "loop"), "sample_every": 0,
                   "warmup": 1}, log=lambda s: None)
            with open(os.path.join(tmp, "loop", perceptual_diffusion.METRICS)) as f:
                last = [json.loads(line) for line in f][-1]               # after the warm-up of the first lines
            return {"train_img_s_mse": last["img_s"], "steps": steps, "with": "EMA, clipping, logging"}
        part("train_loop", train_loop)

        def stages():                              # in bf16 where the GPU has it, as the cifar10 presets train
            more = {} if tiny else dict(stage1_steps=48, stage2_steps=24)
            precision = "bf16" if dev.type == "cuda" and bf16 else "fp32"
            res = reproduce("smoke", os.path.join(tmp, "r"), device, log=lambda s: None, train={"precision": precision},
                            **more)
            return {"minutes": res["wall_seconds"] / 60, "rulers_on": res["device"], "rows": len(res["rows"]),
                    "precision": precision}
        part("stages_and_evaluation", stages)

        def kill_and_rerun():
            steps, every = (120, 5) if tiny else (600, 50)     # headroom: the kill must land before the end
            line = print_commands("smoke", min(max(gpus, 1), 2), os.path.join(tmp, "k"), device=device,
                                  log=lambda s: None, stage1_steps=steps, train={"ckpt_every": every, "log_every": 1})[0]
            argv = shlex.split(line)[3:]                               # after torchrun and its launch flags
            nproc = int(shlex.split(line)[2].split("=")[1])
            ckpt = os.path.join(tmp, "k", "mse", "ckpt.pt")
            code, _, err = launch(argv[1:], nproc, kill_after=every + 2)
            at = load_checkpoint(ckpt)["step"]
            if not every <= at < steps:
                raise RuntimeError(f"after the kill the checkpoint is at step {at}, not between {every} and {steps}")
            code, stdout, err = launch(argv[1:], nproc)
            if code or f"at step {at}" not in stdout:
                raise RuntimeError(f"the relaunch did not continue from step {at}: {(err.strip().splitlines() or [''])[-1]}")
            before = open(ckpt, "rb").read()
            code, stdout, err = launch(argv[1:], nproc)
            if code or open(ckpt, "rb").read() != before:
                raise RuntimeError("launching the finished stage again changed it")
            return {"killed_at_checkpoint": at, "ranks": nproc, "continued_and_finished": steps, "third_launch": "untouched"}
        part("kill_and_rerun", kill_and_rerun)

        def ddp():    # a stage 2 on 2 ranks: the frozen copy, the lambda's all-reduce, a stop poll (step 10)
            init = os.path.join(tmp, "r", "mse", "ckpt.pt")
            if not os.path.isfile(init):
                raise RuntimeError("it fine-tunes the stage 1 of stages_and_evaluation, which did not finish")
            c = {**TRAIN_DEFAULTS, **load_checkpoint(init)["config"]}
            stage = {**c, "loss": "self-perceptual", "init": init, "steps": 12, "sp_with_mse": "auto", "batch_size": 8,
                     "log_every": 4, "sample_every": 0, "out": os.path.join(tmp, "ddp"), "device": device}
            code, stdout, err = launch(["train", *shlex.split(train_flags(stage, {"resume"}))], 2)
            if code or "2 rank(s)" not in stdout or "step 12/12" not in stdout:
                raise RuntimeError((err.strip().splitlines() or ["no output"])[-1])
            lam = load_checkpoint(os.path.join(tmp, "ddp", "ckpt.pt"))["config"]["sp_lambda_value"]
            return {"backend": "nccl" if dev.type == "cuda" else "gloo", "ranks": 2, "stage": "self-perceptual, "
                    "--sp-with-mse auto", "sp_lambda_value": lam}
        part("ddp_2_ranks", ddp, None if dev.type == "cpu" or gpus >= 2 else
             f"multi-rank NCCL not exercised: {gpus} GPU here (the 1-rank launch above ran)")

        weights = os.path.join(torch.hub.get_dir(), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")

        def fid():    # the real network: standard FID, and the paired rulers in its 2048-d features
            ruler = Ruler("fid", "shapes", os.path.join(tmp, "data"), cfg["image_size"], 0, 500, dev, log=lambda s: None)
            model = UNet(**model_kwargs({**TRAIN_DEFAULTS, **cfg, "num_classes": 10})).to(dev).eval()
            n, schedule = 200 if tiny else 2000, schedule_from(TRAIN_DEFAULTS)
            res, _ = evaluate_model(model, schedule, ruler, 200, 4, resamples=20)
            return {"fid_untrained_model": standard_fid(model, schedule, ruler, n, 4), "samples": n,
                    "paired_fd_2048d": res["fd"], "kid": res["kid"], "precision": res["precision"]}
        part("standard_fid", fid, None if importlib.util.find_spec("pytorch_fid") and os.path.isfile(weights) else
             f"pytorch-fid or its weights ({weights}) are not here, and nothing downloads them in this check")
    figures["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    if "train_loop" in figures:    # this device's achieved FLOP/s in the real loop, applied to each preset's count
        achieved = figures["train_loop"]["train_img_s_mse"] * count_flops(cfg)["mse"]
        figures["achieved_tflop_s"] = achieved / 1e12
        figures["projected_hours"] = {name: sum(n * unit_flops(p)[kind] for _, n, kind in work(p)) / achieved / 3600
                                      for name, p in PRESETS.items() if p.get("target") == "gpu"}
        log(f"this device: {achieved / 1e12:.2f} TFLOP/s achieved (training loop); hours per preset, at that rate: "
            + ", ".join(f"{k} {v:.1f} h" for k, v in figures["projected_hours"].items()))
    figures.update(paths=paths, failures=failures)
    with open(out, "w") as f:
        json.dump(figures, f, indent=1)
    log(f"wrote {out}: {len(failures)} failure(s)" + (f": {', '.join(failures)}" if failures else ""))
    return failures
