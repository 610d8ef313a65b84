"""Training recipe of the reference models (VAE, decoder fine-tune, UNet + text encoder, few-step distillation).

    python -m paradiff.reference.train --stage vae|decoder|unet|fast|all --out DIR --seed S [--smoke]

Stages write into DIR: `vae/` (+ `tokenizer/`), `shapes-sd/` (main pipeline, DDIM), `shapes-sd-fast/` (LCM).
`decoder` fine-tunes the VAE decoder with the encoder frozen (the latent space stays, so it can run after the UNet
too) and replaces the VAE of the pipelines already in DIR. Data is rendered on the training device (see data.py);
the unet stage pre-encodes a latent cache once. Measured on one H100: vae ~19-23 it/s (batch 64), decoder ~25 it/s,
unet ~10 it/s eager, ~13 compiled (batch 512; compile ~80 s), fast ~11 it/s. Use --<stage>-minutes to fit a budget.
`--smoke` runs every stage on the CPU with tiny step counts. Each stage records command, device, time and metrics
in `training.json` (and `TRAINING.md`) next to the weights.

The shipped weights took 1004 s of stage time (their training.json): vae 1.5 min, unet 7 min with min-SNR weighting
(the old default: positions stayed random), unet --resume 1.4 min (uniform loss, high noise oversampled: 66%),
decoder 1.3 min (clean reconstructions passing the checker 67% -> 97%), unet --resume 4 min (94% at CFG 3), then
fast 1.7 min (89/95/94% at 1/2/4 steps). The from-scratch recipe, verified on one H100 in 874 s of stage time
(14.6 min; 92.2% at CFG 3, fast 88/88/89% at 1/2/4 steps; benchmarks/results/reference-models.md):

    python -m paradiff.reference.train --out R --stage vae --vae-minutes 1.5
    python -m paradiff.reference.train --out R --stage unet --unet-minutes 5.5 --cache 200000 --high-noise-frac 0.3 --no-eval
    python -m paradiff.reference.train --out R --stage decoder --decoder-minutes 1.25
    python -m paradiff.reference.train --out R --stage unet --resume --unet-minutes 3.75 --cache 200000 --lr 3e-4
    python -m paradiff.reference.train --out R --stage fast --teacher-samples 6144 --fast-minutes 1.25

`--stage unet --resume` into a DIR without a model continues from the shipped weights, e.g. (one GPU, then
re-distil the few-step model):

    python -m paradiff.reference.train --stage unet --resume --out .ref --unet-minutes 4 --cache 200000 --lr 3e-4
    python -m paradiff.reference.train --stage fast --out .ref --teacher-samples 6144 --fast-minutes 1.25
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import queue
import random
import shlex
import sys
import threading
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import build
from .data import IMAGE_SIZE, SceneSampler, caption, heldout_set, parse_caption, render, render_silhouette


# ------------------------------------------------------------------------------------------------ utilities

def _device():
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer_step(opt, loss, params) -> None:
    """One step of every stage: gradients of `loss`, clipped to norm 1 over `params`, applied by `opt`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _progress(step, total, t0, cap_minutes):
    """Fraction of the stage done: by steps, or by wall time when a time cap is set (whichever is further)."""
    p = step / max(1, total)
    if cap_minutes:
        p = max(p, (time.time() - t0) / (cap_minutes * 60))
    return min(1.0, p)


def _lr_at(step, progress, base, warmup):
    """Linear warm-up over `warmup` steps, then cosine to 10% of `base` as progress goes to 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _scheduled_steps(bar, steps, cap_minutes, opt, base_lr, warmup):
    """A stage's step indices from `bar`: sets the LR for each and stops at the step count or the time cap."""
    t_start = time.time()
    for step in bar:
        prog = _progress(step, steps, t_start, cap_minutes)
        if prog >= 1.0:
            print(f"time cap of {cap_minutes} min reached at step {step}")
            return
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, prog, base_lr, warmup)
        yield step


class Prefetch:
    """Samples scenes and tokenizes captions in a background thread, so the GPU never waits on Python."""

    def __init__(self, seed, batch, tok, drop_prob=0.0, depth=4):
        self.sampler = SceneSampler(seed)
        self.rng = random.Random(seed + 1)
        self.batch, self.tok, self.drop = batch, tok, drop_prob
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            scenes = self.sampler.batch(self.batch)
            caps = ["" if self.rng.random() < self.drop else caption(s) for s in scenes]
            ids = None
            if self.tok is not None:
                ids = self.tok(caps, padding="max_length", max_length=self.tok.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
            self.q.put((scenes, caps, ids))

    def get(self):
        return self.q.get()

    def close(self):
        self.stop = True
        try:
            while True:
                self.q.get_nowait()
        except queue.Empty:
            pass


class EMA:
    """Exponential moving average of parameters (fused foreach update: one launch, not one per tensor)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, model):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def _record(folder, stage, args, device, seconds, metrics, extra=None):
    """Write training.json (merged per stage) and a short TRAINING.md next to the weights."""
    path = os.path.join(folder, "training.json")
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    stages = info.setdefault("stages", {})
    base, n = stage, 2
    while stage in stages:  # a stage that ran again (e.g. a second --resume) keeps the earlier record
        stage, n = f"{base}_{n}", n + 1
    stages[stage] = {
        "command": "python -m paradiff.reference.train " + " ".join(shlex.quote(a) for a in args.argv),
        "device": _device_name(device),
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "metrics": metrics,
        **(extra or {}),
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    write_training_md(folder, info)


def write_training_md(folder, info):
    lines = ["# How these weights were made", "",
             "Trained by `paradiff.reference.train` (procedural shapes data, see `paradiff/reference/data.py`).",
             "Stages are listed in the order they ran; `unet_resume` continued from the weights before it and",
             "`vae_decoder` fine-tuned the VAE decoder only (the encoder, so the latent space, is unchanged).", ""]
    total = 0.0
    for name, st in info["stages"].items():
        total += st["seconds"]
        lines += [f"## stage `{name}`", "", f"- command: `{st['command']}`", f"- device: {st['device']}, torch "
                  f"{st['torch']}", f"- time: {st['seconds']} s ({st['date']})"]
        for k, v in st.items():
            if k not in ("command", "device", "torch", "seconds", "date", "metrics"):
                lines.append(f"- {k}: {v}")
        lines += ["- metrics: `" + json.dumps(st["metrics"]) + "`", ""]
    lines += [f"Total stage time: {total:.0f} s.", ""]
    with open(os.path.join(folder, "TRAINING.md"), "w") as f:
        f.write("\n".join(lines))


def merge_records(folder, other, prefix=""):
    """Copy another folder's stage records (e.g. the VAE's, or the teacher's) into this folder's training.json."""
    path = os.path.join(folder, "training.json")
    with open(path) as f:
        info = json.load(f)
    if not os.path.exists(os.path.join(other, "training.json")):  # e.g. a VAE seeded from the shipped model
        return
    with open(os.path.join(other, "training.json")) as f:
        extra = json.load(f)["stages"]
    stages = {prefix + k: v for k, v in extra.items() if prefix + k not in info["stages"]}
    stages.update(info["stages"])
    info["stages"] = dict(sorted(stages.items(), key=lambda kv: kv[1]["date"]))  # in the order they ran
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    write_training_md(folder, info)


# ------------------------------------------------------------------------------------------------ VAE stage

def train_vae(args, device):
    tok_dir = os.path.join(args.out, "tokenizer")
    build.write_tokenizer(tok_dir, seed=args.seed)
    _, _, vae, _ = build.new_components(tok_dir, seed=args.seed)
    vae.to(device).train()
    steps = args.vae_steps
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    pf = Prefetch(args.seed + 11, args.vae_batch, None)
    t0 = time.time()
    done = 0
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in _scheduled_steps(bar, steps, args.vae_minutes, opt, args.vae_lr, min(200, steps // 10 + 1)):
        scenes, _, _ = pf.get()
        x = render(scenes, device) * 2 - 1
        with _autocast(device):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / (4 * 32 * 32)
        loss = l1 + mse + args.kl_weight * kl
        _optimizer_step(opt, loss, vae.parameters())
        done += 1
        if step % 100 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.2f}")
    pf.close()
    vae.eval()
    # latent scale: make the diffusion latents unit-variance, like SD's 0.18215
    with torch.no_grad(), _autocast(device):
        scenes = SceneSampler(args.seed + 99).batch(256 if not args.smoke else 8)
        x = render(scenes, device) * 2 - 1
        z = vae.encode(x).latent_dist.mean.float()
        rec = vae.decode(z).sample.float().clamp(-1, 1)
        psnr = (10 * torch.log10(4.0 / F.mse_loss(rec, x.float()))).item()
        std = z.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    out = os.path.join(args.out, "vae")
    vae.save_pretrained(out, safe_serialization=True)
    dt = time.time() - t0
    metrics = {"steps": done, "recon_psnr_db": round(psnr, 2), "latent_std": round(std, 4),
               "scaling_factor": vae.config.scaling_factor, **_recon_metrics(vae, device, args)}
    print("vae done", metrics, f"{dt:.0f}s")
    _record(out, "vae", args, device, dt, metrics)
    return metrics


@torch.no_grad()
def _recon_metrics(vae, device, args) -> dict:
    """Reconstruction of the clean held-out renders, judged like generated images: checker adherence and the
    fraction of pixels off by more than 0.3 (of a 0-1 range). Mean PSNR hides a speckle at a shape's edge; the
    checker does not (the first shipped VAE: 32.5 dB, yet 31% of its reconstructions failed the checker)."""
    from .checker import check

    caps = [c for c, _ in heldout_set(args.eval_prompts)]
    x = render([parse_caption(c) for c in caps], device) * 2 - 1
    with _autocast(device):
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    err = (rec - x).abs().amax(1) / 2
    imgs = ((rec + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    ok = sum(check(im, c).matched for im, c in zip(imgs, caps))
    return {"recon_adherence": round(ok / len(caps), 4),
            "recon_bad_pixels": round(float((err > 0.3).float().mean()), 5)}


def _seed_vae_from_shipped_model(out: str) -> None:
    """Copy the shipped model's VAE and tokenizer into OUT where OUT has none."""
    import shutil

    from paradiff.reference import DEFAULT_MODEL

    for part in ("vae", "tokenizer"):
        if not os.path.exists(os.path.join(out, part)):
            shutil.copytree(os.path.join(DEFAULT_MODEL, part), os.path.join(out, part))


def train_decoder(args, device):
    """Fine-tune the VAE decoder with the encoder frozen, so the latent space (and any UNet trained on it) stays.

    Why: the encoder parks large values (|z| ~ 11 where the median is 3.5) at one edge of each shape and the
    decoder, trained 1.5 min, paints them as a speckle that breaks the shape's outline. A hard-pixel term (the
    mean of each image's worst 1% pixel errors) targets exactly those pixels, and noise on the latents (up to
    `--decoder-latent-noise` in the UNet's scaled units) makes the decoder tolerant of a sampler's small errors.
    Writes OUT/vae and replaces the VAE of OUT/shapes-sd and OUT/shapes-sd-fast where they exist.
    """
    from diffusers import AutoencoderKL

    vae_dir = os.path.join(args.out, "vae")
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        _seed_vae_from_shipped_model(args.out)
        print("decoder: starting from the shipped VAE")
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(device).eval()
    vae.requires_grad_(False)
    parts = [vae.post_quant_conv, vae.decoder]
    params = [p for m in parts for p in m.parameters()]
    for m in parts:
        m.requires_grad_(True)
        m.train()
    t0 = time.time()
    before = _recon_metrics(vae, device, args) if not args.no_eval else {}
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    pf = Prefetch(args.seed + 55, args.vae_batch, None)
    gen = torch.Generator(device).manual_seed(args.seed + 56)
    noise_raw = args.decoder_latent_noise / vae.config.scaling_factor
    steps = args.decoder_steps
    t_start, done = time.time(), 0
    bar = tqdm(range(steps), desc="decoder", mininterval=5)
    for step in _scheduled_steps(bar, steps, args.decoder_minutes, opt, args.decoder_lr, min(50, steps // 10 + 1)):
        scenes, _, _ = pf.get()
        x = render(scenes, device) * 2 - 1
        with torch.no_grad(), _autocast(device):
            z = vae.encode(x).latent_dist.sample(gen).float()
        sigma = torch.rand(z.shape[0], 1, 1, 1, device=device, generator=gen) * noise_raw
        z = z + sigma * torch.randn(z.shape, device=device, generator=gen)
        with _autocast(device):
            rec = vae.decode(z).sample.float()
        err = (rec - x).abs().mean(1).flatten(1)
        hard = err.topk(max(1, err.shape[1] // 100), dim=1).values.mean()
        loss = err.mean() + F.mse_loss(rec, x) + args.decoder_hard_weight * hard
        _optimizer_step(opt, loss, params)
        done += 1
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", hard=f"{hard.item():.3f}")
    pf.close()
    train_s = time.time() - t_start
    vae.eval()
    metrics = {"steps": done, "batch": args.vae_batch, "train_seconds": round(train_s, 1)}
    if not args.no_eval:
        after = _recon_metrics(vae, device, args)
        metrics.update({f"{k}_before": v for k, v in before.items()})
        metrics.update(after)
    vae.save_pretrained(vae_dir, safe_serialization=True)
    dt = time.time() - t0
    print("decoder done", metrics, f"{dt:.0f}s")
    _record(vae_dir, "vae_decoder", args, device, dt, metrics)
    for name in ("shapes-sd", "shapes-sd-fast"):  # same encoder, so the pipelines' UNets stay valid
        folder = os.path.join(args.out, name)
        if os.path.exists(os.path.join(folder, "model_index.json")):
            copy.deepcopy(vae).to("cpu", torch.float16).save_pretrained(os.path.join(folder, "vae"),
                                                                        safe_serialization=True)
            _record(folder, "vae_decoder", args, device, dt, metrics)
    return metrics


# ------------------------------------------------------------------------------------------------ UNet stage

def _noise_schedule(device):
    sched = build.make_scheduler()
    return sched, sched.alphas_cumprod.to(device)


def _noised(x0, acp, gen, high_noise_frac):
    """Random timesteps (`high_noise_frac` of them from [600, 1000): layout, where shapes go, is decided at high
    noise, so oversample it), and for them alpha-bar, the noised latents and the v-prediction target."""
    b, device = x0.shape[0], x0.device
    t = torch.randint(0, 1000, (b,), device=device, generator=gen)
    if high_noise_frac > 0:
        hi = torch.rand(b, device=device, generator=gen) < high_noise_frac
        t = torch.where(hi, torch.randint(600, 1000, (b,), device=device, generator=gen), t)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    a = acp[t].view(-1, 1, 1, 1)
    return t, a, a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0


def _encode_latents(vae, scenes, device):
    with torch.no_grad(), _autocast(device):
        x = render(scenes, device) * 2 - 1
        return vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor


@torch.no_grad()
def _latent_cache(vae, tok, n, seed, device, chunk=1024):
    """Pre-render and pre-encode n training scenes (latents + token ids) on the device.

    Rendering and VAE-encoding every step made the first GPU run launch-bound (~10 it/s); a cache of a few
    hundred thousand jittered scenes costs ~20 s once and then each step only indexes it.
    """
    sampler = SceneSampler(seed)
    lat = torch.empty((n, 4, 32, 32), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                      device=device)
    ids = torch.empty((n, tok.model_max_length), dtype=torch.long, device=device)
    for i in tqdm(range(0, n, chunk), desc="latent cache", mininterval=5):
        scenes = sampler.batch(min(chunk, n - i))
        caps = [caption(s) for s in scenes]
        ids[i:i + len(scenes)] = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                     return_tensors="pt").input_ids.to(device)
        lat[i:i + len(scenes)] = _encode_latents(vae, scenes, device).to(lat.dtype)
    return lat, ids


def _seed_from_shipped_model(out: str) -> None:
    """`--resume` into an empty OUT: start from the model shipped in the package (its weights, VAE, tokenizer)."""
    import shutil

    from paradiff.reference import DEFAULT_MODEL

    dst = os.path.join(out, "shapes-sd")
    if os.path.exists(os.path.join(dst, "model_index.json")):
        return
    shutil.copytree(DEFAULT_MODEL, dst, dirs_exist_ok=True)
    _seed_vae_from_shipped_model(out)
    print("resuming from the shipped model", DEFAULT_MODEL)


def train_unet(args, device):
    from diffusers import AutoencoderKL

    if args.resume:
        _seed_from_shipped_model(args.out)
    tok_dir = os.path.join(args.out, "tokenizer")
    tok, text, _, unet = build.new_components(tok_dir, seed=args.seed)
    vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae")).to(device).eval()
    vae.requires_grad_(False)
    dst = os.path.join(args.out, "shapes-sd")
    if args.resume and os.path.exists(os.path.join(dst, "model_index.json")):
        from diffusers import StableDiffusionPipeline

        prev = StableDiffusionPipeline.from_pretrained(dst, torch_dtype=torch.float32)
        unet.load_state_dict(prev.unet.state_dict())
        text.load_state_dict(prev.text_encoder.state_dict())
        print("resumed from", dst)
    unet.to(device).train()
    text.to(device).train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_u, ema_t = EMA(unet, args.ema), EMA(text, args.ema)
    _, acp = _noise_schedule(device)
    steps = args.unet_steps
    t0 = t_cache = time.time()
    cache_lat, cache_ids = _latent_cache(vae, tok, args.cache, args.seed + 22 + 1000 * int(args.resume), device)
    cache_s = time.time() - t_cache
    empty_ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    empty_ids = empty_ids.to(device)
    gen = torch.Generator(device).manual_seed(args.seed)
    fwd = unet
    if args.compile and device.type == "cuda":
        fwd = torch.compile(unet)
    compiled_ok = fwd is not unet
    t_start, done = time.time(), 0
    bar = tqdm(range(steps), desc="unet", mininterval=5)
    losses = []
    warmup = min(300, steps // 10 + 1) if not args.resume else 50
    for step in _scheduled_steps(bar, steps, args.unet_minutes, opt, args.lr, warmup):
        idx = torch.randint(0, cache_lat.shape[0], (args.batch,), device=device, generator=gen)
        x0 = cache_lat[idx].float()
        drop = torch.rand(args.batch, 1, device=device, generator=gen) < 0.1  # caption dropout, for CFG
        ids = torch.where(drop, empty_ids, cache_ids[idx])
        t, a, xt, v = _noised(x0, acp, gen, args.high_noise_frac)
        with _autocast(device):
            emb = text(ids)[0]
            try:
                pred = fwd(xt, t, emb).sample
            except Exception as e:  # torch.compile is optional: fall back to eager on any compile failure
                if fwd is unet:
                    raise
                print("torch.compile failed, running eager:", repr(e)[:300])
                fwd, compiled_ok = unet, False
                pred = fwd(xt, t, emb).sample
        if args.weighting == "minsnr":
            # min-SNR-5 (for v-prediction: min(snr, 5) / (snr + 1)). Measured: it starves the high-noise steps
            # that decide layout (positions came out random after 4.4k steps), hence "uniform" by default
            snr = a / (1 - a)
            w = torch.clamp(snr, max=5.0) / (snr + 1)
        else:
            w = 1.0
        loss = (w * (pred.float() - v) ** 2).mean()
        _optimizer_step(opt, loss, params)
        done += 1
        ema_u.update(unet, step)
        ema_t.update(text, step)
        losses.append(loss.item() if step % 50 == 0 else None)
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t_start
    del cache_lat, cache_ids
    ema_u.copy_to(unet)
    ema_t.copy_to(text)
    unet.eval()
    text.eval()
    build.save_pipeline(dst, tok, text.cpu(), vae.cpu(), unet.cpu())
    metrics = {"steps": done, "batch": args.batch, "final_loss": round(float(loss.item()), 5),
               "train_seconds": round(train_s, 1), "compiled": compiled_ok,
               "cache_scenes": args.cache, "cache_seconds": round(cache_s, 1)}
    if not args.no_eval:
        metrics.update(_eval_folder(dst, device, args, fast=False))
    dt = time.time() - t0
    print("unet done", metrics, f"{dt:.0f}s")
    _record(dst, "unet" if not args.resume else "unet_resume", args, device, dt, metrics)
    merge_records(dst, os.path.join(args.out, "vae"))
    return metrics


# ------------------------------------------------------------------------------------------------ few-step stage

@torch.no_grad()
def _teacher_samples(pipe, n, batch, steps, guidance, seed, device, tok):
    """Teacher (main model, CFG) trajectories: start noise z, final latent x0, token ids, for n train prompts."""
    sampler = SceneSampler(seed)
    sched = build.make_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator(device).manual_seed(seed)
    zs, x0s, idss = [], [], []
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
    for _ in tqdm(range(0, n, batch), desc="teacher", mininterval=5):
        caps = [caption(s) for s in sampler.batch(batch)]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        with _autocast(device):
            cond = pipe.text_encoder(ids)[0]
            unc = pipe.text_encoder(empty)[0].expand_as(cond)
        emb = torch.cat([unc, cond]).float()
        z = torch.randn((batch, 4, 32, 32), device=device, generator=gen)
        x = z
        for t in sched.timesteps:
            with _autocast(device):
                out = pipe.unet(torch.cat([x, x]), t.to(device), emb).sample.float()
            u, c = out.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        zs.append(z)
        x0s.append(x)
        idss.append(ids)
    return torch.cat(zs), torch.cat(x0s), torch.cat(idss)


def train_fast(args, device):
    from diffusers import StableDiffusionPipeline

    src = os.path.join(args.out, "shapes-sd")
    dst = os.path.join(args.out, "shapes-sd-fast")
    pipe = StableDiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32).to(device)
    tok, text, unet = pipe.tokenizer, pipe.text_encoder.eval(), pipe.unet.eval()
    text.requires_grad_(False)
    t0 = time.time()
    z, x0, ids = _teacher_samples(pipe, args.teacher_samples, args.teacher_batch, args.teacher_steps,
                                  args.guidance, args.seed + 33, device, tok)
    teacher_s = time.time() - t0
    with torch.no_grad(), _autocast(device):
        embs = torch.cat([text(ids[i:i + 512])[0] for i in range(0, len(ids), 512)]).float()
    student = copy.deepcopy(unet).train()
    student.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.fast_lr, weight_decay=0.0)
    ema = EMA(student, args.ema)
    _, acp = _noise_schedule(device)
    grid = torch.arange(19, 1000, 20, device=device)  # LCMScheduler's 50-step skeleton: 19, 39, ..., 999
    gen = torch.Generator(device).manual_seed(args.seed + 44)
    n = len(z)
    steps = args.fast_steps
    bar = tqdm(range(steps), desc="fast", mininterval=5)
    t1, done = time.time(), 0
    for step in _scheduled_steps(bar, steps, args.fast_minutes, opt, args.fast_lr, min(100, steps // 10 + 1)):
        idx = torch.randint(0, n, (args.batch,), device=device, generator=gen)
        tx0, tz, temb = x0[idx], z[idx], embs[idx]
        # half the batch at t=999 from the teacher's own start noise (the 1-step map), half at other grid steps
        # with fresh noise (the denoiser used by steps 2-4 and by img2img streaming)
        first = torch.rand(args.batch, device=device, generator=gen) < 0.5
        t = torch.where(first, torch.full_like(idx, 999), grid[torch.randint(0, 50, (args.batch,), device=device,
                                                                              generator=gen)])
        a = acp[t].view(-1, 1, 1, 1)
        fresh = torch.randn(tx0.shape, device=device, generator=gen)
        xt = torch.where(first.view(-1, 1, 1, 1), tz, a.sqrt() * tx0 + (1 - a).sqrt() * fresh)
        with _autocast(device):
            v = student(xt, t, temb).sample.float()
        x0_pred = a.sqrt() * xt - (1 - a).sqrt() * v
        loss = F.mse_loss(x0_pred, tx0)
        _optimizer_step(opt, loss, student.parameters())
        done += 1
        ema.update(student, step)
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t1
    ema.copy_to(student)
    student.eval()
    build.save_pipeline(dst, tok, text.cpu(), pipe.vae.cpu(), student.cpu(), fast=True)
    metrics = {"steps": done, "batch": args.batch, "teacher_samples": n, "teacher_seconds": round(teacher_s, 1),
               "train_seconds": round(train_s, 1), "final_loss": round(float(loss.item()), 5),
               "guidance_baked": args.guidance}
    if not args.no_eval:
        metrics.update(_eval_folder(dst, device, args, fast=True))
    dt = time.time() - t0
    print("fast done", metrics, f"{dt:.0f}s")
    _record(dst, "fast", args, device, dt, metrics)
    merge_records(dst, src, prefix="teacher_")
    return metrics


# ------------------------------------------------------------------------------------------------ ControlNet stage

# the condition embedding downsamples twice (stride-2 convs): 128x128 silhouettes -> the 32x32 latents (diffusers'
# default has three, for SD's 8x VAE)
CONTROLNET_EMBEDDING_CHANNELS = (16, 32, 64)


@torch.no_grad()
def _control_cache(vae, tok, n, seed, device, chunk=1024):
    """Pre-encode n training scenes: latents, token ids of the full and of the position-free caption, silhouettes.

    Silhouettes are kept as one uint8 channel (16 KiB a scene); the latents as in the unet stage's cache.
    """
    sampler = SceneSampler(seed)
    lat = torch.empty((n, 4, 32, 32), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                      device=device)
    ids = torch.empty((2, n, tok.model_max_length), dtype=torch.long, device=device)
    sil = torch.empty((n, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, device=device)
    for i in tqdm(range(0, n, chunk), desc="control cache", mininterval=5):
        scenes = sampler.batch(min(chunk, n - i))
        for k, positions in enumerate((True, False)):
            caps = [caption(s, positions=positions) for s in scenes]
            ids[k, i:i + len(scenes)] = tok(caps, padding="max_length", max_length=tok.model_max_length,
                                            truncation=True, return_tensors="pt").input_ids.to(device)
        lat[i:i + len(scenes)] = _encode_latents(vae, scenes, device).to(lat.dtype)
        sil[i:i + len(scenes)] = (render_silhouette(scenes, device)[:, :1] * 255 + 0.5).to(torch.uint8)
    return lat, ids, sil


def train_controlnet(args, device):
    """Train a ControlNet on the shape silhouette for the frozen reference pipeline (`--base`, default the shipped
    model); only the ControlNet learns. Captions are 10% empty (CFG), `--nopos-frac` position-free and the rest
    full, so the map alone must place the shapes. Writes OUT/shapes-controlnet (diffusers ControlNetModel, fp32)."""
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from paradiff.reference import DEFAULT_MODEL

    base = args.base or DEFAULT_MODEL
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32).to(device)
    tok, text, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    for m in (text, vae, unet):
        m.eval().requires_grad_(False)
    torch.manual_seed(args.seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)
    cn.to(device).train()
    opt = torch.optim.AdamW(cn.parameters(), lr=args.controlnet_lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMA(cn, args.controlnet_ema)
    _, acp = _noise_schedule(device)
    t0 = time.time()
    lat, ids, sil = _control_cache(vae, tok, args.cache, args.seed + 66, device)
    cache_s = time.time() - t0
    empty_ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    empty_ids = empty_ids.to(device)
    gen = torch.Generator(device).manual_seed(args.seed + 67)
    steps, b = args.controlnet_steps, args.controlnet_batch
    t_start, done, losses = time.time(), 0, []
    bar = tqdm(range(steps), desc="controlnet", mininterval=5)
    for step in _scheduled_steps(bar, steps, args.controlnet_minutes, opt, args.controlnet_lr,
                                 min(100, steps // 10 + 1)):
        idx = torch.randint(0, lat.shape[0], (b,), device=device, generator=gen)
        x0 = lat[idx].float()
        cond = (sil[idx].float() / 255).expand(-1, 3, -1, -1)
        u = torch.rand(b, 1, device=device, generator=gen)
        cap_ids = torch.where(u < 0.1, empty_ids, torch.where(u < 0.1 + args.nopos_frac, ids[1, idx], ids[0, idx]))
        t, _, xt, v = _noised(x0, acp, gen, args.high_noise_frac)
        with _autocast(device):
            with torch.no_grad():
                emb = text(cap_ids)[0]
            down, mid = cn(xt, t, emb, controlnet_cond=cond, return_dict=False)
            pred = unet(xt, t, emb, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), v)
        _optimizer_step(opt, loss, cn.parameters())
        done += 1
        ema.update(cn, step)
        if step % 50 == 0:
            losses.append(round(loss.item(), 5))
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_s = time.time() - t_start
    del lat, ids, sil
    ema.copy_to(cn)
    cn.eval()
    dst = os.path.join(args.out, "shapes-controlnet")
    cn.to("cpu").save_pretrained(dst, safe_serialization=True)  # fp32: 3.1M parameters, 12 MB
    metrics = {"steps": done, "batch": b, "final_loss": round(float(loss.item()), 5),
               "train_seconds": round(train_s, 1), "steps_per_second": round(done / max(train_s, 1e-9), 2),
               "cache_scenes": args.cache, "cache_seconds": round(cache_s, 1), "loss_every_50": losses}
    if not args.no_eval:
        metrics.update(_eval_controlnet(pipe, dst, device, args))
    dt = time.time() - t0
    print("controlnet done", {k: v for k, v in metrics.items() if k != "loss_every_50"}, f"{dt:.0f}s")
    _record(dst, "controlnet", args, device, dt, metrics, extra={"base": os.path.relpath(base, args.out)
                                                                 if base != DEFAULT_MODEL else "DEFAULT_MODEL"})
    return metrics


@torch.no_grad()
def _eval_controlnet(pipe, folder, device, args) -> dict:
    """Held-out adherence of base + ControlNet, for position-free and full captions (`control_heldout_set`): the
    checker against the scene's full caption, and the map metrics (`checker.map_adherence`). The base model alone
    on the position-free captions is the floor (`*_nopos_base`): where it puts shapes is chance."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from .checker import check, map_adherence
    from .data import control_heldout_set

    cn = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    cpipe = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=cn,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (pipe, cpipe):
        p.set_progress_bar_config(disable=True)
    steps = 2 if args.smoke else 25
    out = {}
    for key, positions, control in (("nopos", False, True), ("full", True, True), ("nopos_base", False, False)):
        cases = control_heldout_set(args.eval_prompts, positions=positions)
        ok = map_ok = 0
        ious = []
        for i in range(0, len(cases), 64):
            chunk = cases[i:i + 64]
            kw = dict(num_inference_steps=steps, guidance_scale=args.eval_guidance[0], output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(c.seed) for c in chunk])
            if control:
                kw["image"] = torch.stack([torch.from_numpy(c.control).permute(2, 0, 1).float() / 255 for c in chunk])
            imgs = (cpipe if control else pipe)([c.prompt for c in chunk], **kw).images
            for c, im in zip(chunk, imgs):
                im = (im * 255 + 0.5).clip(0, 255).astype("uint8")
                ok += check(im, c.caption).matched
                m = map_adherence(im, c.control)
                map_ok += m.matched
                ious.append(m.iou)
        out[f"adherence_{key}"] = round(ok / len(cases), 4)
        out[f"map_adherence_{key}"] = round(map_ok / len(cases), 4)
        out[f"map_iou_{key}"] = round(sum(ious) / len(ious), 4)
        print(folder, key, out[f"adherence_{key}"], out[f"map_adherence_{key}"], out[f"map_iou_{key}"])
    out["eval_steps"], out["eval_guidance"] = steps, args.eval_guidance[0]
    return out


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def _eval_folder(folder, device, args, fast):
    """Prompt adherence of the saved pipeline on the held-out prompts (the checker decides from pixels)."""
    from diffusers import StableDiffusionPipeline

    from .checker import check

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_set(args.eval_prompts)
    out = {}
    settings = [(s, 1.0) for s in (1, 2, 4)] if fast else [(25, g) for g in args.eval_guidance]
    if args.smoke:  # exercise the code path only
        settings = settings[:1] if fast else [(2, args.eval_guidance[0])]
    for steps, g in settings:
        ok = 0
        for i in range(0, len(prompts), 64):
            chunk = prompts[i:i + 64]
            gens = [torch.Generator("cpu").manual_seed(s) for _, s in chunk]
            imgs = pipe([c for c, _ in chunk], num_inference_steps=steps, guidance_scale=g, generator=gens,
                        output_type="np").images
            for (c, _), im in zip(chunk, imgs):
                ok += check((im * 255 + 0.5).clip(0, 255).astype("uint8"), c).matched
        key = f"adherence_{steps}step" + ("" if fast else f"_cfg{g:g}")
        out[key] = round(ok / len(prompts), 4)
        print(folder, key, out[key])
    pipe.to("cpu")
    return out


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "decoder", "unet", "fast", "controlnet", "all"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny step counts on the CPU, for tests")
    p.add_argument("--resume", action="store_true", help="unet stage: continue from OUT/shapes-sd")
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-steps", type=int, default=4000)
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--decoder-hard-weight", type=float, default=1.0, help="weight of the worst-1%%-pixels term")
    p.add_argument("--decoder-latent-noise", type=float, default=0.1,
                   help="max std of the noise added to latents (scaled units) while fine-tuning the decoder")
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cache", type=int, default=400_000, help="pre-encoded training scenes for the unet stage")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--weighting", choices=["uniform", "minsnr"], default="uniform", help="v-loss weighting")
    p.add_argument("--high-noise-frac", type=float, default=0.0,
                   help="fraction of each batch drawn from t in [600, 1000) instead of uniformly")
    p.add_argument("--fast-steps", type=int, default=3000)
    p.add_argument("--fast-lr", type=float, default=1e-4)
    p.add_argument("--teacher-samples", type=int, default=8192)
    p.add_argument("--teacher-batch", type=int, default=512)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale baked into the fast model")
    p.add_argument("--controlnet-steps", type=int, default=4000)
    p.add_argument("--controlnet-batch", type=int, default=256)
    p.add_argument("--controlnet-lr", type=float, default=2e-4)
    p.add_argument("--controlnet-ema", type=float, default=0.995,
                   help="EMA decay of the ControlNet (short: a ControlNet's zero convolutions start learning late)")
    p.add_argument("--nopos-frac", type=float, default=0.6,
                   help="controlnet stage: fraction of captions with the position phrases withheld")
    p.add_argument("--base", default=None,
                   help="controlnet stage: the frozen pipeline folder (default: the shipped DEFAULT_MODEL)")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    for st in ("vae", "decoder", "unet", "fast", "controlnet"):
        p.add_argument(f"--{st}-minutes", type=float, default=0.0,
                       help=f"wall-time budget of the {st} stage: the LR schedule ends and training stops there")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.vae_steps, args.vae_batch, args.unet_steps, args.batch, args.cache = 3, 2, 3, 2, 8
        args.decoder_steps = 2
        args.fast_steps, args.teacher_samples, args.teacher_batch, args.teacher_steps = 2, 4, 2, 2
        args.controlnet_steps, args.controlnet_batch = 3, 2
        args.eval_prompts, args.no_eval = 1, False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = _device()
    if args.smoke:
        device = torch.device("cpu")
    os.makedirs(args.out, exist_ok=True)
    stages = ["vae", "decoder", "unet", "fast"] if args.stage == "all" else [args.stage]
    results = {}
    run = {"vae": train_vae, "decoder": train_decoder, "unet": train_unet, "fast": train_fast,
           "controlnet": train_controlnet}
    for st in stages:
        results[st] = run[st](args, device)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
