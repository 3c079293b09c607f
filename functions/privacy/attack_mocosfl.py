"""MocoSFL's model-inversion attack protocol (--attack_protocol mocosfl), as its run_sflmoco.py runs it after training.

* The attacker's data: a share (--attack_data_proportion, MocoSFL 1 %) of the run's own training images, each
  passed alone through the frozen client part (eval mode); the image it learns to rebuild is the image after a
  JPEG round trip (MocoSFL writes them as .jpg files and reads them back; quality 75, PIL's default).
* The decoder: always res_normN4C64 (MocoSFL's run_sflmoco.py names it whatever --MIA_arch says), BatchNorm,
  PyTorch's default initialisation; Adam 1e-3, mean squared error, batches of 32, --attack_epochs (MocoSFL 50)
  epochs over 90 % of those pairs (a fixed shuffle, seed 123). The decoder stays in training mode throughout, also
  on the other 10 %: after every validation batch whose loss is the lowest so far, the decoder (with the BatchNorm
  statistics that batch left) is kept, and the kept one attacks.
* The targets: --attack_images (MocoSFL 128) fixed images of the attacked client, each through the client part
  alone; the decoder in eval mode rebuilds them, and each reconstruction is scored against the JPEG round trip of
  its image (MSE, SSIM in MocoSFL's convention, PSNR), image by image, then averaged.
"""
from __future__ import annotations

import copy
import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from functions.core.errors import UserError
from functions.privacy.attack import image_figures
from models.decoders import inversion_decoder

MOCOSFL_DECODER = "res_normN4C64"
SPLIT_SEED = 123  # MocoSFL's shuffle of the attacker's pairs into training and validation
TRAIN_SHARE = 0.9
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
JPEG_QUALITY = 75  # PIL's default, which torchvision's save_image to a .jpg file uses


def jpeg_round_trip(images: Tensor) -> Tensor:
    """(B, 3, H, W) images in [0, 1] saved as JPEG and read back, as MocoSFL's attack stores its images."""
    from PIL import Image

    pixels = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    restored = []
    for picture in pixels:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        buffer.seek(0)
        restored.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.as_tensor(np.stack(restored)).permute(0, 3, 1, 2).float().div(255.0)


def attack_set_size(num_train_images: int, proportion: float) -> int:
    """How many of the run's training images the attacker gets (MocoSFL: int(len * 0.01)); at least ten, so that
    both its training and its validation share hold images."""
    count = int(num_train_images * proportion)
    if count < 10:
        raise UserError(f"--attack_protocol mocosfl: {proportion} of the run's {num_train_images} training images is "
                        f"{count}; the attacker needs at least 10 (raise --attack_data_proportion)")
    return count


def _smashed_one_by_one(client: Callable[[Tensor], Tensor], images: Tensor, normalise: Callable[[Tensor], Tensor],
                        device: torch.device) -> Tensor:
    """The client's output for each image alone (MocoSFL feeds batches of one), as float on the CPU."""
    with torch.no_grad():
        return torch.cat([client(normalise(image[None].to(device))).float().cpu() for image in images])


def split_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """MocoSFL's 90 / 10 split of the attacker's pairs: a shuffle with seed 123, the first int(floor(0.9 n)) train."""
    order = np.arange(count)
    np.random.RandomState(SPLIT_SEED).shuffle(order)
    cut = int(np.floor(TRAIN_SHARE * count))
    return order[:cut], order[cut:]


# One epoch's batches: row indices of the training pairs, then of the validation pairs.
EpochBatches = Callable[[int], tuple[list[Tensor], list[Tensor]]]


def shuffled_batches(train_rows: np.ndarray, validation_rows: np.ndarray, generator: torch.Generator) -> EpochBatches:
    """Every epoch both shares reshuffled (MocoSFL's random samplers) into batches of 32."""
    def epoch_batches(epoch: int) -> tuple[list[Tensor], list[Tensor]]:
        batches = []
        for rows in (train_rows, validation_rows):
            order = torch.as_tensor(rows)[torch.randperm(len(rows), generator=generator)]
            batches.append(list(order.split(BATCH_SIZE)))
        return batches[0], batches[1]
    return epoch_batches


def train_decoder(decoder: nn.Module, smashed: Tensor, images: Tensor, epochs: int,
                  batches: EpochBatches) -> tuple[dict[str, Tensor], float]:
    """MocoSFL's decoder training on (smashed, images) pairs, batches(epoch) giving each epoch's row batches;
    returns the kept state (that after the validation batch of lowest loss) and that loss."""
    device = next(decoder.parameters()).device
    optimizer = torch.optim.Adam(decoder.parameters(), lr=LEARNING_RATE)
    best_state, best_loss = copy.deepcopy(decoder.state_dict()), float("inf")
    decoder.train()  # MocoSFL never switches to eval mode while it trains and validates
    for epoch in range(epochs):
        train_batches, validation_batches = batches(epoch)
        for rows in train_batches:
            loss = F.mse_loss(decoder(smashed[rows].to(device)), images[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        for rows in validation_batches:
            with torch.no_grad():
                loss = F.mse_loss(decoder(smashed[rows].to(device)), images[rows].to(device))
            if float(loss) < best_loss:
                best_loss, best_state = float(loss), copy.deepcopy(decoder.state_dict())
    return best_state, best_loss


def attack_figures(decoder: nn.Module, target_smashed: Tensor, truth: Tensor) -> tuple[dict[str, float], Tensor]:
    """The decoder (eval mode) on each target's smashed data alone; MSE, SSIM and PSNR against `truth`, image by
    image, averaged (MocoSFL's test_attack); and the reconstructions."""
    device = next(decoder.parameters()).device
    decoder.eval()
    with torch.no_grad():
        reconstructed = torch.cat([decoder(row[None].to(device)).cpu() for row in target_smashed])
    return image_figures(reconstructed, truth), reconstructed


def invert_mocosfl(client: Callable[[Tensor], Tensor], attack_images: Tensor, targets: Tensor, *,
                   normalise: Callable[[Tensor], Tensor], epochs: int = 50, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[dict[str, float], Tensor]:
    """MocoSFL's attack: train res_normN4C64 on the attacker's images (B, 3, H, W) in [0, 1], rebuild the targets;
    return the figures (against the targets' JPEG round trip; with the mean image's) and the reconstructions."""
    device = torch.device(device)
    smashed = _smashed_one_by_one(client, attack_images, normalise, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = inversion_decoder(MOCOSFL_DECODER, smashed.shape[1], smashed.shape[-1],
                                    attack_images.shape[-1]).to(device)
    train_rows, validation_rows = split_pairs(smashed.shape[0])
    batches = shuffled_batches(train_rows, validation_rows, torch.Generator().manual_seed(seed))
    best_state, best_loss = train_decoder(decoder, smashed, jpeg_round_trip(attack_images), epochs, batches)
    decoder.load_state_dict(best_state)
    truth = jpeg_round_trip(targets)
    figures, reconstructed = attack_figures(decoder, _smashed_one_by_one(client, targets, normalise, device), truth)
    mean_image = jpeg_round_trip(attack_images).mean(dim=0, keepdim=True).expand_as(truth)
    baseline = image_figures(mean_image, truth)
    return {**figures, **{f"mean_image_{key}": value for key, value in baseline.items()},
            "best_validation_loss": best_loss}, reconstructed
