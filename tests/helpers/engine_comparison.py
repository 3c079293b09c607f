"""Running the loop and the vectorised client engines side by side and comparing their clients, server and steps."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from functions.sfl.clients.loop import ClientSide
from functions.sfl.clients.vmap import VectorisedClientSide
from models.split import build_split_model

LR, MOMENTUM, WEIGHT_DECAY, KEY_MOMENTUM = 0.05, 0.9, 5e-4, 0.9
CPU = torch.device("cpu")
# float64 for the client-side checks: in float32 a ReLU input within rounding of zero may switch sides between
# the loop's and the vectorised convolution and move one gradient entry by 1e-3; in float64 that does not happen.
TOLERANCE = dict(rtol=1e-9, atol=1e-10)

TRAINER_TOLERANCE = dict(rtol=1e-4, atol=2e-4)  # the Trainer runs in float32


def client_sides(cutlayer: int, num_client: int, engine: str = "auto", template: nn.Module | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format
                  ) -> tuple[ClientSide, VectorisedClientSide]:
    """A loop and a vectorised client side holding the same, client-specific weights."""
    template = client_template(cutlayer) if template is None else template
    loop = ClientSide(template, num_client, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                      keep_momentum_copies=True, device=CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every client its own weights, so a row sent to the wrong client changes the numbers
        for model in [*loop.models, *loop.momentum_models]:
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    vectorised = VectorisedClientSide(template, num_client, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                      keep_momentum_copies=True, device=CPU, engine=engine, memory_format=memory_format)
    vectorised.load_state_dict(loop.state_dict())
    return loop, vectorised


def random_crops(total_rows: int, seed: int) -> list[torch.Tensor]:
    """Two 16-pixel crops and one 8-pixel crop (two resolutions, as in multi-crop), rows grouped by client."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(total_rows, 3, 16, 16), (total_rows, 3, 16, 16), (total_rows, 3, 8, 8)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def engine_step(clients, crops, pool, rows, scaler, seed, poison_rows=None):
    """One client step as the training loop does it; returns (loss, the server's gradient rows, client grads)."""
    clients.zero_grad(pool)
    smashed = clients.forward(crops, pool, rows)
    inputs = [s.detach().requires_grad_(True) for s in smashed]
    loss = server_loss(inputs, seed)
    scaler.scale(loss).backward()
    gradients = [x.grad.clone() for x in inputs]
    if poison_rows is not None:
        gradients[0][poison_rows] = float("inf")
    clients.backward(gradients)
    grads = {c: [p.grad.clone() for p in clients.models[c].parameters()] for c in pool}
    clients.step(pool, scaler)
    scaler.update()
    clients.update_momentum_copies(pool, KEY_MOMENTUM)
    return loss.detach(), gradients, grads


def assert_same_step(actual, expected, pool) -> None:
    """Two results of step agree: the loss, the server's gradient rows and each pool client's gradients."""
    (loss, gradient_rows, grads), (expected_loss, expected_rows, expected_grads) = actual, expected
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    for rows, expected_rows_of_crop in zip(gradient_rows, expected_rows, strict=True):
        torch.testing.assert_close(rows, expected_rows_of_crop, **TOLERANCE)
    for c in pool:
        for gradient, expected_gradient in zip(grads[c], expected_grads[c], strict=True):
            torch.testing.assert_close(gradient, expected_gradient, **TOLERANCE)


def assert_same_clients(loop, vectorised, clients, tolerance=TOLERANCE) -> None:
    """Both client sides hold the same weights and momentum copies for the given clients."""
    assert len(vectorised.models) == len(loop.models)
    assert len(vectorised.momentum_models) == len(loop.momentum_models)
    for c in clients:
        for expected, actual in zip(client_weights_of(loop.models, c), client_weights_of(vectorised.models, c)):
            torch.testing.assert_close(actual, expected, **tolerance)
        if len(loop.momentum_models):
            for expected, actual in zip(client_weights_of(loop.momentum_models, c), client_weights_of(vectorised.momentum_models, c)):
                torch.testing.assert_close(actual, expected, **tolerance)


def train_side_by_side(expected, actual, steps: int, dtype: torch.dtype = torch.float32):
    """`steps` training steps of both trainers on the same batches (crops in `dtype`), with equal losses; returns
    the last batch."""
    batches = (dataclasses.replace(batch, crops=[crop.to(dtype) for crop in batch.crops])
               for batch in expected.data.loaders.train.epoch(0))
    for trainer in (expected, actual):
        trainer.set_learning_rates(0, 0)
    for step in range(steps):
        batch = next(batches)
        expected_loss, _ = expected.train_step(batch)
        loss, _ = actual.train_step(batch)
        torch.testing.assert_close(loss, expected_loss, **TRAINER_TOLERANCE)
        expected.global_step = actual.global_step = step + 1
    return batch


def assert_same_server(expected, actual, tolerance=TRAINER_TOLERANCE) -> None:
    """Both trainers' server methods hold the same tensors (weights, momentum encoder, queue, prototypes)."""
    for value, expected_value in zip(actual.method.state_dict().values(), expected.method.state_dict().values()):
        torch.testing.assert_close(value, expected_value, **tolerance)


def client_template(cutlayer: int) -> nn.Module:
    """The client part of a narrow (width 8) ResNet-18 cut at `cutlayer`, in float64."""
    torch.manual_seed(0)
    return build_split_model("ResNet18", cutlayer, width=8).client.double()


def server_loss(inputs: list[torch.Tensor], seed: int) -> torch.Tensor:
    """A non-linear function of every row of every crop (row-specific weights, so row order matters)."""
    generator = torch.Generator().manual_seed(seed)
    total = inputs[0].new_zeros(())
    for x in inputs:
        projection = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        total = total + ((x * projection).flatten(1).sum(dim=1) ** 2).mean() / x[0].numel()
    return total


def client_weights_of(models, client: int) -> list[torch.Tensor]:
    """Copies of client `client`'s parameters, in module order."""
    return [p.detach().clone() for p in models[client].parameters()]
