"""Golden part: MocoSFL's ResNet-18 client at cuts 1-3 for 32, 64, 96 and 224-pixel images.

Records the smashed-data shape of its client at full width, and, at width 4, the client's weights (GroupNorm's
scales and shifts drawn at random) and its output
on a seeded input (outputs over 32x32 as channel statistics and a strided subsample, to keep the file small).

    python benchmarks/golden/resnet_stem.py --peer_dir MOCOSFL_CHECKOUT
"""
from __future__ import annotations

import argparse
from typing import Any

import peer

IMAGE_SIZES = (32, 64, 96, 224)
CUTS = (1, 2, 3)
TINY_WIDTH = 4
INPUT_SEED = 1234
FULL_OUTPUT_PIXELS = 32 * 32  # larger outputs are kept as statistics and a subsample
SUBSAMPLE = 8  # every 8th row and column of a larger output


def seeded_input(size: int) -> Any:
    """The input every test regenerates: one image of N(0, 1) values from INPUT_SEED."""
    import torch

    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(INPUT_SEED + size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer_dir", required=True)
    options = parser.parse_args()
    peer.import_mocosfl(options.peer_dir)
    import torch
    from models import resnet  # MocoSFL's

    torch.manual_seed(0)
    shapes: dict[str, list[int]] = {}
    for size in IMAGE_SIZES:
        for cut in CUTS:
            model = resnet.ResNet18(cutting_layer=cut, num_client=1, num_class=128, group_norm=True, input_size=size)
            shapes[f"{size}_cut{cut}"] = list(model.get_smashed_data_size(1, size))
    peer.scale_resnet_width(resnet, TINY_WIDTH)
    tensors: dict[str, Any] = {}
    for size in IMAGE_SIZES:
        torch.manual_seed(size)
        model = resnet.ResNet18(cutting_layer=max(CUTS), num_client=1, num_class=16, group_norm=True,
                                input_size=size)
        client = model.local_list[0].eval()
        with torch.no_grad():  # GroupNorm's initial 1 / 0 would hide a scale or shift read from the wrong key
            for module in client.modules():
                if isinstance(module, torch.nn.GroupNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
        tensors[f"weights_{size}"] = {key: value.clone() for key, value in client.state_dict().items()}
        with torch.no_grad():
            image = seeded_input(size)
            for cut in CUTS:
                output = client[:cut](image)
                if output.shape[2] * output.shape[3] > FULL_OUTPUT_PIXELS:
                    tensors[f"output_{size}_cut{cut}_mean"] = output.mean(dim=(2, 3))
                    tensors[f"output_{size}_cut{cut}_square_mean"] = output.square().mean(dim=(2, 3))
                    tensors[f"output_{size}_cut{cut}_subsample"] = output[:, :, ::SUBSAMPLE, ::SUBSAMPLE].clone()
                else:
                    tensors[f"output_{size}_cut{cut}"] = output.clone()
    peer.write_fixture("resnet_stem", options.peer_dir,
                       {"smashed_shapes": shapes, "tiny_width": TINY_WIDTH, "input_seed": INPUT_SEED,
                        "input": "torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(input_seed + s))",
                        "subsample": SUBSAMPLE,
                        "full_output_pixels": FULL_OUTPUT_PIXELS},
                       tensors)


if __name__ == "__main__":
    main()
