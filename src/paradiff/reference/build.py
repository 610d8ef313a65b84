"""Architecture of the reference model: tokenizer files, component configs, and assembling/saving the pipeline.

The components mirror Stable Diffusion 1.x (CLIP text encoder, KL autoencoder, UNet2DConditionModel with
CrossAttn/Down/Up blocks, GroupNorm, self+cross attention) at tiny widths, because the parallel methods wrap
exactly those diffusers modules; only the sizes differ.
"""

from __future__ import annotations

import json
import os
import random
import shutil

from .data import COLORS, POSITION_PHRASES, SHAPES, SIZES, SceneSampler, caption

MAX_LENGTH = 32
TEXT_DIM = 128

TEXT_CONFIG = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=TEXT_DIM,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=128,
)

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 192),
    layers_per_block=1,
    cross_attention_dim=TEXT_DIM,
    # like SD 2.x, per-block number of heads; few wide heads keep CPU sampling fast (25 CFG steps in ~2 s)
    attention_head_dim=(1, 2, 4),
    norm_num_groups=32,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def grammar_words() -> list[str]:
    words = {"a", "an", "and", "background", "gradient", ","}
    words |= set(COLORS) | set(SHAPES) | set(SIZES)
    for p in POSITION_PHRASES.values():
        words |= set(p.split())
    return sorted(words)


def write_tokenizer(path: str, seed: int = 0) -> None:
    """Train a tiny CLIP-style BPE (end-of-word suffix '</w>', byte-level alphabet) on grammar captions.

    Every grammar word ends up as one token; any other text still tokenizes (into byte-level pieces).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    os.makedirs(path, exist_ok=True)
    sampler = SceneSampler(seed, exclude=set())
    corpus = [caption(s) for s in sampler.batch(4000)] + grammar_words()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    # CLIP vocabularies hold every byte symbol both bare and with '</w>'
    for ch in sorted(alphabet):
        for t in (ch, ch + "</w>"):
            if t not in vocab:
                vocab[t] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0, sort_keys=False)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(
            {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>"}, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": "<|startoftext|>",
             "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "do_lower_case": True}, f, indent=2)


def load_tokenizer(path: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


def new_components(tokenizer_dir: str, seed: int = 0):
    """Fresh (random-init) text encoder, VAE and UNet with the reference architecture."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **TEXT_CONFIG)
    text = CLIPTextModel(text_cfg)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return tok, text, vae, unet


def make_scheduler(fast: bool = False):
    from diffusers import DDIMScheduler, LCMScheduler

    if fast:
        cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)}
        return LCMScheduler(**cfg, original_inference_steps=50)
    return DDIMScheduler(**SCHEDULER_CONFIG)


def save_pipeline(path: str, tok, text, vae, unet, fast: bool = False, dtype=None) -> None:
    """Write a complete StableDiffusionPipeline folder (safetensors; fp16 by default to stay small)."""
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if dtype is None else dtype
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=make_scheduler(fast),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(dtype=dtype)
    # transformers loads with dtype="auto" (the stored dtype): keep the small text encoder in fp32 so that a plain
    # from_pretrained() gives an all-fp32 pipeline (diffusers models load as fp32 by default)
    text.to(torch.float32)
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.to(dtype=torch.float32)
    # also ship the classic CLIP vocabulary files (vocab.json + merges.txt) for slow/older CLIPTokenizer loaders
    src = getattr(tok, "name_or_path", "")
    for name in ("vocab.json", "merges.txt"):
        if src and os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(path, "tokenizer", name))


def count_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":  # quick look at sizes
    import tempfile

    d = tempfile.mkdtemp()
    write_tokenizer(d)
    tok, text, vae, unet = new_components(d)
    print("vocab", len(tok), "text", count_params(text), "vae", count_params(vae), "unet", count_params(unet))
    print(tok("a small red circle in the top left corner, blue gradient background").input_ids)
    print(tok.convert_ids_to_tokens(tok("a large star in the center, white background").input_ids))
    random.seed(0)
