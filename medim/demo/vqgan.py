"""The demo's VQGAN training: lesion-rich phantoms, a k-means-seeded codebook and plain VQ-VAE steps
on the real `medim.models.vqgan.VQGAN` class."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from medim.data import synthetic
from medim.data.images import preprocess
from medim.demo.settings import IMAGE_SIZE

logger = logging.getLogger(__name__)

__all__ = ["lesion_rich_pixels", "kmeans", "train_vqgan"]


def lesion_rich_pixels(n: int, seed: int, lesion_prob: float = 0.75) -> torch.Tensor:
    """`n` phantoms `[n, 3, 64, 64]` in [-1, 1] with a lesion in each quadrant with probability
    `lesion_prob` (for VQGAN training only).

    In report-distributed phantoms lesions cover ~5% of the pixels, less than the tissue-level
    jitter costs in MSE, so a VQGAN trained on them spends its codes on tissue first and erases
    every lesion for thousands of steps (seen on CPU builds). Lesion-rich images make lesions a
    large share of the loss: reconstructions read back right after a few hundred steps.

    Example:
        >>> lesion_rich_pixels(8, seed=0).shape
        torch.Size([8, 3, 64, 64])
    """
    rng = np.random.default_rng([seed, 1])
    images = []
    for _ in range(n):
        lesions = tuple(synthetic.Lesion(side, level, synthetic.SIZES[rng.integers(2)],
                                         synthetic.DENSITIES[rng.integers(2)])
                        for side in synthetic.SIDES for level in synthetic.LEVELS if rng.random() < lesion_prob)
        images.append(synthetic.make_pair(rng, IMAGE_SIZE, spec=synthetic.PhantomSpec(lesions))[0])
    return preprocess(images, size=IMAGE_SIZE)


def kmeans(pool: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """`k` centres `[k, D]` of the rows of `pool` `[N, D]` (draws from torch's global RNG).

    k-means++ seeding draws each new centre far from those already drawn, so rare vectors such as
    a lesion's get centres of their own; Lloyd iterations then refine them.

    Example:
        >>> kmeans(torch.randn(1000, 16), 128).shape
        torch.Size([128, 16])
    """
    idx = [int(torch.randint(0, len(pool), (1,)))]
    dist = (pool - pool[idx[0]]).pow(2).sum(1)
    for _ in range(k - 1):
        idx.append(int(torch.multinomial(dist + 1e-12, 1)))
        dist = torch.minimum(dist, (pool - pool[idx[-1]]).pow(2).sum(1))
    centres = pool[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(pool, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, pool)
        filled = counts > 0  # an empty cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def train_vqgan(pixels: torch.Tensor, steps: int, device: torch.device, batch_size: int = 64, seed: int = 0,
                n_embed: int = 128):
    """Train a small VQGAN (the real `VQGAN` class) on phantom pixels and return it in eval mode.

    Plain VQ-VAE training is enough for phantoms (flat regions and round lesions): MSE
    reconstruction, codebook and commitment losses with a straight-through estimator, no GAN.
    The first quarter of the steps trains a plain autoencoder; the codebook is then set by k-means
    on the encoder outputs of up to 1024 images, and later unused codes are re-seeded from the
    worst-quantised vectors. Quantising earlier, or seeding from one batch, sometimes leaves the
    lesions without codes of their own: the encoder then learns to drop them and never recovers
    (seen on CPU builds, where a run either reads lesions back or erases all of them).

    Example:
        >>> vq = train_vqgan(lesion_rich_pixels(4000, seed=0), 600, torch.device("cpu"), batch_size=16)
    """
    from medim.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(seed)
    config = VQGANConfig(embed_dim=16, n_embed=n_embed, z_channels=64, resolution=IMAGE_SIZE, ch=32,
                         ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    vq = VQGAN(config).to(device).train()
    pixels = pixels.to(device)
    batch_size = min(batch_size, len(pixels))
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    book = vq.quantize.embedding.weight
    warmup, refresh = max(steps // 4, 1), max(steps // 20, 1)
    usage = torch.zeros(config.n_embed, device=device)
    for step in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), device=device)]
        z = vq.quant_conv(vq.encoder(x))
        flat = z.permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
        if step < warmup:  # autoencoder warm-up: the codebook is seeded from what it learns
            zq, vq_loss = flat, 0.0
        else:
            codes = vq._nearest_code(flat.detach())
            usage += torch.bincount(codes, minlength=config.n_embed)
            e = book[codes]
            vq_loss = F.mse_loss(e, flat.detach()) + 0.25 * F.mse_loss(flat, e.detach())
            zq = flat + (e - flat).detach()
        zq = zq.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = F.mse_loss(vq.decoder(vq.post_quant_conv(zq)), x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            if step + 1 == warmup:
                sample = pixels[torch.randperm(len(pixels), device=device)[:1024]]
                latents = torch.cat([vq.quant_conv(vq.encoder(chunk)) for chunk in sample.split(128)])
                book.copy_(kmeans(latents.permute(0, 2, 3, 1).reshape(-1, config.embed_dim), config.n_embed))
                usage.zero_()
            elif step >= warmup and (step + 1) % refresh == 0 and step < steps * 0.8:
                dead, pool = (usage == 0).nonzero().flatten(), flat.detach()
                if len(dead):
                    error = (pool - book[vq._nearest_code(pool)]).pow(2).sum(1)
                    book[dead] = pool[torch.multinomial(error + 1e-12, len(dead), replacement=len(dead) > len(pool))]
                usage.zero_()
        if (step + 1) % max(steps // 10, 1) == 0:
            logger.info("vqgan step %d/%d loss %.4f", step + 1, steps, loss.item())
    return vq.eval()
