"""The model families of the end-to-end benchmark, built from configs with random weights.

Each :class:`ModelSpec` builds its model (nothing is downloaded), makes a pool of synthetic batches
and computes the training loss. ``quick=True`` gives tiny versions that train on a CPU in seconds.

The synthetic data is learnable, so a loss curve has a shape and methods that break the math show
up in it: token sequences follow a random bigram language (1024 words, each with 8 possible
successors, so the loss floor is ln 8), images are a per-class smooth template plus noise, and the UNet learns to
predict the noise added to such images (DDPM's objective).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "MODELS", "BATCHES_IN_POOL", "model_names"]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and score one model family of the benchmark."""

    name: str
    package: str  # the import the model needs (models whose package is missing are skipped)
    build: Callable[[bool], nn.Module]  # quick -> model with random weights, on the default device
    make_batches: Callable[[bool, torch.Generator, int], list[Batch]]  # quick, generator, count -> CPU batches
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    items_per_batch: Callable[[Batch], int]  # throughput counts these (tokens or images)
    unit: str
    channels_last: bool  # CNNs train in channels_last
    lr: float

    def available(self) -> bool:
        """Whether the package this model needs can be imported here."""
        return importlib.util.find_spec(self.package) is not None

    def describe(self, batch: Batch) -> str:
        """The shape of one batch, for the results header: ``'8 x 512'``."""
        first = next(iter(batch.values()))
        return " x ".join(str(d) for d in first.shape)


BATCHES_IN_POOL = 4  # distinct batches a benchmark run cycles through (every configuration alike)
BIGRAM_BRANCHING = 8
ACTIVE_VOCAB = 1024  # tokens the language uses: few enough that 200 GPT-2 steps learn its bigrams


def bigram_tokens(n_seq: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences of a random bigram language over 1024 of the ``vocab`` tokens (8 successors each).

    The language is drawn first from ``generator``, so every call with a generator of the same seed
    speaks the same language whatever ``n_seq`` is.
    """
    words = torch.randperm(vocab, generator=generator)[:ACTIVE_VOCAB]
    n_words = len(words)
    successors = torch.randint(n_words, (n_words, BIGRAM_BRANCHING), generator=generator)
    choice = torch.randint(BIGRAM_BRANCHING, (n_seq, seq_len), generator=generator)
    index = torch.empty(n_seq, seq_len, dtype=torch.long)
    index[:, 0] = torch.randint(n_words, (n_seq,), generator=generator)
    for i in range(1, seq_len):
        index[:, i] = successors[index[:, i - 1], choice[:, i]]
    return words[index]


def template_images(n: int, classes: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (``3 x size x size``): a smooth random template per class plus noise, and labels."""
    templates = torch.randn(classes, 3, 4, 4, generator=generator)
    labels = torch.randint(classes, (n,), generator=generator)
    smooth = F.interpolate(templates[labels], size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.5 * torch.randn(n, 3, size, size, generator=generator), labels


# ----- Hugging Face transformers: GPT-2 small (causal LM) and BERT-base (masked LM) -----


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def _tiny_transformer_config() -> dict:
    return dict(vocab_size=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _with_loss_type(model: nn.Module, loss_type: str) -> nn.Module:
    """``model`` with its loss named on the model itself.

    transformers reads ``model.loss_type`` (set from the class name, ``None`` for ``GPT2LMHeadModel``)
    and, when it is unknown, logs a warning inside forward: a torch.compile graph break in the first
    model compiled in a process (the warning is logged once), which made the ``compile`` baseline
    two graphs before session 10. The config's ``loss_type`` alone does not prevent it.
    """
    model.config.loss_type = model.loss_type = loss_type
    return model


def build_gpt2(quick: bool) -> nn.Module:
    """GPT-2 small (124M) from its default config; ``quick``: 2 layers of width 64."""
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, **_tiny_transformer_config())
    else:
        config = GPT2Config()
    return _with_loss_type(GPT2LMHeadModel(config), "ForCausalLM")


def gpt2_batches(quick: bool, generator: torch.Generator, count: int) -> list[Batch]:
    """``count`` causal-LM batches of 8 x 512 tokens (``quick``: 2 x 32)."""
    batch, seq, vocab = (2, 32, 256) if quick else (8, 512, 50257)
    tokens = bigram_tokens(count * batch, seq, vocab, generator)
    return [{"input_ids": t, "labels": t} for t in tokens.split(batch)]


def build_bert(quick: bool) -> nn.Module:
    """BERT-base (110M) masked LM from its default config; ``quick``: 2 layers of width 64."""
    _quiet_transformers()
    from transformers import BertConfig, BertForMaskedLM

    if quick:
        config = BertConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=64, **_tiny_transformer_config(),
        )
    else:
        config = BertConfig()
    return _with_loss_type(BertForMaskedLM(config), "ForMaskedLM")


BERT_MASK_TOKEN = 103  # [MASK] in BERT's vocabulary
MASKED_FRACTION = 0.15


def bert_batches(quick: bool, generator: torch.Generator, count: int) -> list[Batch]:
    """``count`` masked-LM batches of 16 x 512 tokens, 15% of them masked (``quick``: 2 x 32)."""
    batch, seq, vocab = (2, 32, 256) if quick else (16, 512, 30522)
    tokens = bigram_tokens(count * batch, seq, vocab, generator)
    masked = torch.rand(tokens.shape, generator=generator) < MASKED_FRACTION
    inputs = tokens.masked_fill(masked, BERT_MASK_TOKEN % vocab)
    labels = tokens.masked_fill(~masked, -100)
    return [{"input_ids": i, "labels": l} for i, l in zip(inputs.split(batch), labels.split(batch))]


def hf_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from ``labels``."""
    return model(**batch).loss


def token_count(batch: Batch) -> int:
    return batch["input_ids"].numel()


# ----- timm: convnext_tiny (LayerNorm, channels-first LayerNorm2d) and resnet50_gn (GroupNorm) -----


def _timm_builder(name: str) -> Callable[[bool], nn.Module]:
    def build(quick: bool) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10 if quick else 1000)

    build.__doc__ = f"timm's {name} with random weights (``quick``: 10 classes, 32 x 32 images)."
    return build


def image_batches(quick: bool, generator: torch.Generator, count: int) -> list[Batch]:
    """``count`` classification batches of 64 images of 224 x 224 (``quick``: 2 of 32 x 32)."""
    batch, size, classes = (2, 32, 10) if quick else (64, 224, 1000)
    batches = []
    for _ in range(count):
        x, y = template_images(batch, classes, size, generator)
        batches.append({"x": x, "y": y})
    return batches


def classifier_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def image_count(batch: Batch) -> int:
    return batch["x"].shape[0]


# ----- diffusers: UNet2DModel (ResBlocks GroupNorm -> SiLU -> Conv, attention with GroupNorm) -----


def build_unet(quick: bool) -> nn.Module:
    """diffusers' UNet2DModel in the DDPM CIFAR-10 configuration (36M); ``quick``: 2 small levels."""
    from diffusers import UNet2DModel

    if quick:
        return UNet2DModel(
            sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
    return UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


DIFFUSION_STEPS = 1000


def diffusion_batches(quick: bool, generator: torch.Generator, count: int) -> list[Batch]:
    """``count`` DDPM batches of 128 noised 32 x 32 images with their timesteps (``quick``: 2 of 16 x 16)."""
    batch, size = (2, 16) if quick else (128, 32)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, DIFFUSION_STEPS), dim=0)
    batches = []
    for _ in range(count):
        clean, _ = template_images(batch, 16, size, generator)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(DIFFUSION_STEPS, (batch,), generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        batches.append({"noisy": a.sqrt() * clean + (1 - a).sqrt() * noise, "t": t, "noise": noise})
    return batches


def noise_prediction_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.mse_loss(model(batch["noisy"], batch["t"]).sample.float(), batch["noise"])


def noisy_image_count(batch: Batch) -> int:
    return batch["noisy"].shape[0]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gpt2", "transformers", build_gpt2, gpt2_batches, hf_loss, token_count, "tok/s", False, 3e-4),
        ModelSpec("bert", "transformers", build_bert, bert_batches, hf_loss, token_count, "tok/s", False, 1e-4),
        ModelSpec(
            "convnext_tiny", "timm", _timm_builder("convnext_tiny"), image_batches, classifier_loss, image_count,
            "img/s", True, 1e-3,
        ),
        ModelSpec(
            "resnet50_gn", "timm", _timm_builder("resnet50_gn"), image_batches, classifier_loss, image_count,
            "img/s", True, 1e-3,
        ),
        ModelSpec(
            "unet", "diffusers", build_unet, diffusion_batches, noise_prediction_loss, noisy_image_count,
            "img/s", True, 2e-4,
        ),
    )
}


def model_names() -> list[str]:
    """Names accepted by ``--models``, in benchmark order.

    Example:
        >>> model_names()[:2]
        ['gpt2', 'bert']
    """
    return list(MODELS)

