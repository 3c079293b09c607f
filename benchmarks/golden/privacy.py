"""Golden part "privacy": MocoSFL's SSIM, ResSFL step, attack decoders, initialisation and expert client parts.

Run: python benchmarks/golden/privacy.py --peer_dir MOCOSFL_CHECKOUT [--experts ../shared/mocosfl-expert]

Writes tests/fixtures/mocosfl/privacy.json and privacy.pt:
* ssim: MocoSFL's pytorch_ssim.SSIM() on fixed image pairs (each pair alone and the batch).
* ressfl: one step of MocoSFL's simulated attacker (MIA_simulator.train, then regularize_grad) on fixed smashed
  data and images, from a fixed decoder: the SSIM it reports and the gradient it returns, for two targets.
* decoders: parameter counts of MocoSFL's decoders and their outputs on a fixed input (training and eval mode);
  each is built after torch.manual_seed(seed), and its weights are stored when small, else checksums of them.
* protocol: MocoSFL's attacker training loop and scoring (MIA_attacker.attack, test_attack) on fixed pairs.
* init: checksums of MocoSFL's ResNet-18 client part (cut 3, C4S2) built after torch.manual_seed(0).
* experts: the published expert client parts (checkpoint_c_best.tar) run on fixed images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import peer

DECODER_CASES = [  # (name, input channels, input side, group norm, seed)
    ("res_normN4C64", 64, 32, False, 1),
    ("res_normN4C64", 4, 16, False, 2),
    ("res_normN4C64", 4, 8, False, 3),
    ("conv_normN2C32", 4, 16, False, 4),
    ("conv_normN1C8", 4, 8, False, 5),
    ("conv_normN1C8", 4, 16, True, 6),
    ("res_normN1C8", 8, 16, True, 7),
    ("custom", 4, 16, False, 8),
    ("custom", 16, 8, False, 9),
]
SMALL_STATE = 3_000  # decoders with at most this many values store their weights
CROP = 8  # decoder outputs are stored as their top-left CROP x CROP pixels, with checksums of the whole


def checksums(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: sum, sum of squares and the first four values (float64), enough to tell two draws apart."""
    sums = {}
    for key, value in state.items():
        flat = value.detach().double().flatten()
        sums[key] = [float(flat.sum()), float((flat * flat).sum()), *[float(v) for v in flat[:4]]]
    return sums


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to multiples of 1/255, so that they are stored exactly as uint8."""
    return images.mul(255).round().div(255)


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """(count, 3, 32, 32) smooth images in [0, 1] (random 4x4 images upsampled bilinearly), quantised."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 4, 4, generator=generator)
    return quantised(torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False))


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    """Quantised images as uint8 (the test divides by 255)."""
    return images.mul(255).round().to(torch.uint8)


def decoder_inputs(channels: int, side: int, seed: int) -> torch.Tensor:
    """The fixed input of a decoder case (the test draws the same)."""
    generator = torch.Generator().manual_seed(100 + seed)
    return torch.relu(torch.randn(4, channels, side, side, generator=generator))


def ssim_part() -> tuple[dict, dict]:
    from functions import pytorch_ssim

    originals = smooth_images(4, 0)
    generator = torch.Generator().manual_seed(1)
    noisy = (originals + 0.1 * torch.randn(originals.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(originals, 3, stride=1, padding=1)
    reconstructed = quantised(torch.cat([noisy[:2], blurred[2:3], torch.rand(1, 3, 32, 32, generator=generator)]))
    per_pair = [float(pytorch_ssim.SSIM()(reconstructed[i:i + 1], originals[i:i + 1])) for i in range(4)]
    batch = float(pytorch_ssim.SSIM()(reconstructed, originals))
    return ({"per_pair": per_pair, "batch": batch},
            {"ssim_originals": as_bytes(originals), "ssim_reconstructed": as_bytes(reconstructed)})


def ressfl_part() -> tuple[dict, dict]:
    from functions.attack_functions import MIA_simulator

    class Stub:
        """The one method of MocoSFL's model that MIA_simulator reads."""

        def get_smashed_data_size(self, batch_size: int = 1, input_size: int = 32) -> torch.Size:
            return torch.Size([batch_size, 4, 16, 16])

    values, tensors = {}, {}
    generator = torch.Generator().manual_seed(2)
    smashed = torch.relu(torch.randn(2, 4, 16, 16, generator=generator))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    images = smooth_images(2, 3)
    query = (images - mean) / std  # normalised as MocoSFL's cifar10 loader does
    tensors.update(ressfl_smashed=smashed, ressfl_images=as_bytes(images))
    # Batch 4: MocoSFL's small-batch attacker (GroupNorm, standardised convolutions); batch 32: BatchNorm and
    # Xavier-initialised plain convolutions. Target 0.5 is above the attacker's SSIM: MocoSFL returns no gradient.
    for target, batch_size in ((0.0, 4), (0.01, 4), (0.5, 4), (0.0, 32)):
        case = f"target_{target}_batch_{batch_size}"
        args = argparse.Namespace(data_size=32, client_sample_ratio=1.0, dataset="cifar10",
                                  ressfl_target_ssim=target, num_client=1, ressfl_alpha=2.0, batch_size=batch_size)
        torch.manual_seed(4)
        simulator = MIA_simulator(Stub(), args, "conv_normN0C8")
        decoder = simulator.local_AE_list[0]
        if target == 0.0:  # the same seed and batch size draw the same decoder for every target
            tensors[f"ressfl_decoder_batch_{batch_size}"] = {k: v.clone() for k, v in decoder.state_dict().items()}
        train_ssim = float(simulator.train(0, smashed.clone(), query.clone()))
        error, gradient = simulator.regularize_grad(0, smashed.clone(), query.clone())
        values[case] = {"target": target, "batch_size": batch_size, "train_ssim": train_ssim,
                        "client_ssim": float(error), "gradient": gradient is not None}
        if gradient is not None:
            tensors[f"ressfl_gradient_{case}"] = gradient
    return values, tensors


def decoder_part() -> tuple[dict, dict]:
    from functions.attack_functions import conv_normN_AE, custom_AE, res_normN_AE

    values, tensors = {}, {}
    for name, channels, side, group_norm, seed in DECODER_CASES:
        torch.manual_seed(seed)
        if name == "custom":
            decoder = custom_AE(input_nc=channels, output_nc=3, input_dim=side, output_dim=32)
        else:
            kind, rest = name.split("_normN")
            depth, width = (int(part) for part in rest.split("C"))
            builder = res_normN_AE if kind == "res" else conv_normN_AE
            decoder = builder(N=depth, internal_nc=width, input_nc=channels, output_nc=3, input_dim=side,
                              output_dim=32, GN_option=group_norm, WS=True)
        key = f"{name}_in{channels}x{side}_{'gn' if group_norm else 'bn'}"
        inputs = decoder_inputs(channels, side, seed)
        state = {k: v.clone() for k, v in decoder.state_dict().items()}
        decoder.train()
        with torch.no_grad():
            train_output = decoder(inputs)
        decoder.eval()  # running statistics: those the training-mode forward left
        with torch.no_grad():
            eval_output = decoder(inputs)
        values[key] = {"name": name, "in_channels": channels, "in_size": side, "group_norm": group_norm,
                       "seed": seed, "parameters": sum(p.numel() for p in decoder.parameters()),
                       "convolutions": sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
                                           for m in decoder.modules()),
                       "checksums": checksums(state),
                       "output_checksums": {"train": checksums({"o": train_output})["o"],
                                            "eval": checksums({"o": eval_output})["o"]}}
        tensors[f"decoder_{key}"] = {"inputs_checksum": checksums({"i": inputs})["i"],
                                     "train_output": train_output[..., :CROP, :CROP].clone(),
                                     "eval_output": eval_output[..., :CROP, :CROP].clone(),
                                     **({"state": state} if sum(v.numel() for v in state.values()) <= SMALL_STATE
                                        else {})}
    return values, tensors


PROTOCOL_TRAIN = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # fixed batches (MocoSFL's loaders are passed as lists)
PROTOCOL_VALIDATION = [[10, 11], [12, 13]]
PROTOCOL_TARGETS = [14, 15, 16]
PROTOCOL_EPOCHS = 3


def protocol_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """17 fixed (image, smashed data) pairs: smooth quantised images and ReLU'd noise of 4 x 16 x 16."""
    images = smooth_images(17, 6)
    smashed = torch.relu(torch.randn(17, 4, 16, 16, generator=torch.Generator().manual_seed(7)))
    return images, smashed


def protocol_part() -> dict:
    """MocoSFL's MIA_attacker.attack (training, validation in training mode, the best validation batch kept) and
    test_attack (eval mode, image by image) on fixed pairs and batches, with conv_normN0C8 drawn after seed 8."""
    import logging
    import tempfile

    from functions.attack_functions import MIA_attacker, conv_normN_AE

    images, smashed = protocol_pairs()
    torch.manual_seed(8)
    decoder = conv_normN_AE(N=0, internal_nc=8, input_nc=4, output_nc=3, input_dim=16, output_dim=32)
    attacker = MIA_attacker.__new__(MIA_attacker)  # its __init__ wants a run; attack() reads only these two
    attacker.MIA_arch = "conv_normN0C8"
    attacker.logger = logging.getLogger("golden_privacy")
    attacker.logger.setLevel(logging.DEBUG)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    attacker.logger.addHandler(handler)
    with tempfile.TemporaryDirectory() as folder:
        paths = {"model_path": f"{folder}/model.pt", "train_output_path": f"{folder}/train",
                 "test_output_path": f"{folder}/test"}
        train = [(images[rows], smashed[rows]) for rows in PROTOCOL_TRAIN]
        validation = [(images[rows], smashed[rows]) for rows in PROTOCOL_VALIDATION]
        optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
        attacker.attack(PROTOCOL_EPOCHS, decoder, optimizer, train, validation, paths, 4)
        kept = torch.load(paths["model_path"])
        targets = [(images[i:i + 1], smashed[i:i + 1], torch.zeros(1)) for i in PROTOCOL_TARGETS]
        mse, ssim_value, psnr = attacker.test_attack(PROTOCOL_EPOCHS, decoder, targets, paths, 1)
    best = [m for m in messages if "Best Validation Loss" in m][0]
    return {"pairs_checksums": {"images": checksums({"x": images})["x"], "smashed": checksums({"x": smashed})["x"]},
            "train_batches": PROTOCOL_TRAIN, "validation_batches": PROTOCOL_VALIDATION, "targets": PROTOCOL_TARGETS,
            "epochs": PROTOCOL_EPOCHS, "decoder_seed": 8, "best_validation_loss": float(best.rsplit(" ", 1)[1]),
            "kept_checksums": checksums(kept), "mse": mse, "ssim": ssim_value, "psnr": psnr}


def init_part() -> dict:
    from models import resnet

    torch.manual_seed(0)
    model = resnet.ResNet18(cutting_layer=3, num_client=1, num_class=128, group_norm=True, input_size=32,
                            adds_bottleneck=True, bottleneck_option="C4S2")
    state = model.local_list[0].state_dict()
    backbone = {key: value for key, value in state.items() if not key.startswith("3.")}
    return {"seed": 0, "cutlayer": 3, "bottleneck": "C4S2", "checksums": checksums(backbone)}


def expert_part(experts: Path) -> tuple[dict, dict]:
    from models import resnet

    values, tensors = {}, {}
    images = quantised(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    tensors["expert_images"] = as_bytes(images)
    for cutlayer in (1, 2, 3):
        folders = sorted(experts.glob(f"*_cut{cutlayer}_*"))
        if not folders:
            raise SystemExit(f"error: no expert folder for cut {cutlayer} in {experts}")
        model = resnet.ResNet18(cutting_layer=cutlayer, num_client=1, num_class=128, group_norm=True,
                                input_size=32, adds_bottleneck=True, bottleneck_option="C4S2")
        client = model.local_list[0]
        client.load_state_dict(torch.load(folders[0] / "checkpoint_c_best.tar", map_location="cpu"))
        client.eval()
        with torch.no_grad():
            tensors[f"expert_output_cut{cutlayer}"] = client(images)
        values[f"cut{cutlayer}"] = folders[0].name
    return values, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True)
    parser.add_argument("--experts", default=str(Path(__file__).resolve().parents[3] / "shared" / "mocosfl-expert"))
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    torch.set_num_threads(1)
    values, tensors = {}, {}
    for part, function in (("ssim", ssim_part), ("ressfl", ressfl_part), ("decoders", decoder_part)):
        part_values, part_tensors = function()
        values[part] = part_values
        tensors.update(part_tensors)
    values["init"] = init_part()
    values["protocol"] = protocol_part()
    part_values, part_tensors = expert_part(Path(options.experts))
    values["experts"] = part_values
    tensors.update(part_tensors)
    peer.write_fixture("privacy", options.peer_dir, values, tensors)
    print(f"wrote {peer.FIXTURE_DIR / 'privacy.json'} and privacy.pt", file=sys.stderr)


if __name__ == "__main__":
    main()
