"""Vectorised client side (--client_exec vmap) against the loop over per-client modules: same numbers, same checkpoints."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from sfl_helpers import moco_trainer, swav_trainer
from torch import nn

from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.sfl.clients.loop import ClientSide
from functions.sfl.clients.vmap import VectorisedClientSide
from functions.sfl.fedavg import average_pool, fedavg
from models.split import build_split_model

LR, MOMENTUM, WEIGHT_DECAY, KEY_MOMENTUM = 0.05, 0.9, 5e-4, 0.9
CPU = torch.device("cpu")
# float64 for the client-side checks: in float32 a ReLU input within rounding of zero may switch sides between
# the loop's and the vectorised convolution and move one gradient entry by 1e-3; in float64 that does not happen.
TOLERANCE = dict(rtol=1e-9, atol=1e-10)
TRAINER_TOLERANCE = dict(rtol=1e-4, atol=2e-4)  # the Trainer runs in float32
FLOAT64_TRAINER_TOLERANCE = dict(rtol=1e-7, atol=1e-8)  # a Trainer converted to float64 (the losses stay float32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _template(cutlayer: int) -> nn.Module:
    """The client part of a narrow (width 8) ResNet-18 cut at `cutlayer`, in float64."""
    torch.manual_seed(0)
    return build_split_model("ResNet18", cutlayer, width=8).client.double()


def _client_sides(cutlayer: int, num_client: int, engine: str = "auto", template: nn.Module | None = None,
                  memory_format: torch.memory_format = torch.contiguous_format
                  ) -> tuple[ClientSide, VectorisedClientSide]:
    """A loop and a vectorised client side holding the same, client-specific weights."""
    template = _template(cutlayer) if template is None else template
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


def _crops(total_rows: int, seed: int) -> list[torch.Tensor]:
    """Two 16-pixel crops and one 8-pixel crop (two resolutions, as in multi-crop), rows grouped by client."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(total_rows, 3, 16, 16), (total_rows, 3, 16, 16), (total_rows, 3, 8, 8)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _server_loss(inputs: list[torch.Tensor], seed: int) -> torch.Tensor:
    """A non-linear function of every row of every crop (row-specific weights, so row order matters)."""
    generator = torch.Generator().manual_seed(seed)
    total = inputs[0].new_zeros(())
    for x in inputs:
        projection = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        total = total + ((x * projection).flatten(1).sum(dim=1) ** 2).mean() / x[0].numel()
    return total


def _step(clients, crops, pool, rows, scaler, seed, poison_rows=None):
    """One client step as the training loop does it; returns (loss, the server's gradient rows, client grads)."""
    clients.zero_grad(pool)
    smashed = clients.forward(crops, pool, rows)
    inputs = [s.detach().requires_grad_(True) for s in smashed]
    loss = _server_loss(inputs, seed)
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


def _assert_same_step(actual, expected, pool) -> None:
    """Two results of _step agree: the loss, the server's gradient rows and each pool client's gradients."""
    (loss, gradient_rows, grads), (expected_loss, expected_rows, expected_grads) = actual, expected
    torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    for rows, expected_rows_of_crop in zip(gradient_rows, expected_rows, strict=True):
        torch.testing.assert_close(rows, expected_rows_of_crop, **TOLERANCE)
    for c in pool:
        for gradient, expected_gradient in zip(grads[c], expected_grads[c], strict=True):
            torch.testing.assert_close(gradient, expected_gradient, **TOLERANCE)


def _weights(models, client: int) -> list[torch.Tensor]:
    """Copies of client `client`'s parameters, in module order."""
    return [p.detach().clone() for p in models[client].parameters()]


def _assert_same_clients(loop, vectorised, clients, tolerance=TOLERANCE) -> None:
    """Both client sides hold the same weights and momentum copies for the given clients."""
    assert len(vectorised.models) == len(loop.models)
    assert len(vectorised.momentum_models) == len(loop.momentum_models)
    for c in clients:
        for expected, actual in zip(_weights(loop.models, c), _weights(vectorised.models, c)):
            torch.testing.assert_close(actual, expected, **tolerance)
        if len(loop.momentum_models):
            for expected, actual in zip(_weights(loop.momentum_models, c), _weights(vectorised.momentum_models, c)):
                torch.testing.assert_close(actual, expected, **tolerance)


ROWS = {"equal": [2, 2, 2], "unequal": [2, 1, 3], "many_counts": [1, 2, 3, 4, 5, 6]}


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("cutlayer", [1, 2])
@pytest.mark.parametrize("rows_name", sorted(ROWS))
def test_vectorised_steps_equal_the_loop_and_leave_other_clients_alone(cutlayer, rows_name, engine):
    rows = ROWS[rows_name]
    num_client = len(rows) + 2
    pool = [num_client - 1, 0, *range(2, len(rows))][: len(rows)]  # a strict subset, not in id order
    loop, vectorised = _client_sides(cutlayer, num_client, engine)
    assert vectorised.engine == engine
    outside = sorted(set(range(num_client)) - set(pool))
    before = {c: _weights(vectorised.models, c) for c in outside}
    before_copies = {c: _weights(vectorised.momentum_models, c) for c in outside}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        crops = _crops(sum(rows), seed=step)
        expected = _step(loop, crops, pool, rows, scaler, seed=10 + step)
        _assert_same_step(_step(vectorised, crops, pool, rows, scaler, seed=10 + step), expected, pool)
        _assert_same_clients(loop, vectorised, pool)
    crops = _crops(sum(rows), seed=99)
    for actual, expected in zip(vectorised.momentum_forward(crops, pool, rows), loop.momentum_forward(crops, pool, rows)):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    for c in outside:  # neither weight decay nor momentum copies may touch clients outside the pool
        assert all(torch.equal(a, b) for a, b in zip(_weights(vectorised.models, c), before[c]))
        assert all(torch.equal(a, b) for a, b in zip(_weights(vectorised.momentum_models, c), before_copies[c]))


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("image_size", [64, 224])
def test_strided_stems_of_64_and_224_pixel_images_run_vectorised(engine, image_size):
    # The stem of 64-pixel images is a 3x3 stride-2 convolution, of 224-pixel ones a 7x7 stride-2 one: both packs
    # keep the convolution's own kernel, stride and padding.
    torch.manual_seed(0)
    template = build_split_model("ResNet18", 2, width=4, image_size=image_size).client.double()
    assert template.stem.conv.stride == (2, 2)
    loop, vectorised = _client_sides(2, 3, engine, template=template)
    assert vectorised.engine == engine
    pool, rows = [2, 0], [1, 2]
    generator = torch.Generator().manual_seed(5)
    crops = [torch.randn(sum(rows), 3, image_size, image_size, generator=generator, dtype=torch.float64)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    expected = _step(loop, crops, pool, rows, scaler, seed=3)
    _assert_same_step(_step(vectorised, crops, pool, rows, scaler, seed=3), expected, pool)
    assert vectorised.forward(crops, pool, rows)[0].shape[-1] == image_size // 2


@pytest.mark.parametrize("cutlayer", [1, 2])
def test_channels_last_gives_the_contiguous_loops_numbers_and_nhwc_smashed_data(cutlayer):
    rows, pool, num_client = [2, 1, 3], [3, 0, 1], 4
    loop, vectorised = _client_sides(cutlayer, num_client, "grouped", memory_format=torch.channels_last)
    nhwc_loop = ClientSide(_template(cutlayer), num_client, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           keep_momentum_copies=True, device=CPU, memory_format=torch.channels_last)
    nhwc_loop.load_state_dict(loop.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc_loop.models[0].parameters() if p.dim() == 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        crops = _crops(sum(rows), seed=step)
        nhwc_crops = [crop.contiguous(memory_format=torch.channels_last) for crop in crops]
        expected = _step(loop, crops, pool, rows, scaler, seed=10 + step)
        for side in (vectorised, nhwc_loop):
            smashed = side.forward(nhwc_crops, pool, rows)
            assert all(s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous() for s in smashed)
            _assert_same_step(_step(side, nhwc_crops, pool, rows, scaler, seed=10 + step), expected, pool)
    _assert_same_clients(loop, vectorised, range(num_client))
    _assert_same_clients(loop, nhwc_loop, range(num_client))


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("rows, pool", [([3, 1, 2], [2, 3, 1]), ([2, 2, 2, 2], [0, 1, 2, 3])],
                         ids=["unequal_subset", "equal_everyone"])
def test_forward_rows_come_back_in_input_order_for_every_client(engine, rows, pool):
    loop, vectorised = _client_sides(cutlayer=2, num_client=4, engine=engine)
    crops = _crops(sum(rows), seed=5)
    expected = []
    begin = 0
    for client, count in zip(pool, rows):  # each client's own module on its own rows, crop by crop
        expected.append([loop.models[client](crop[begin:begin + count]) for crop in crops])
        begin += count
    actual = vectorised.forward(crops, pool, rows)
    for k in range(len(crops)):
        torch.testing.assert_close(actual[k], torch.cat([per_client[k] for per_client in expected]), **TOLERANCE)


def test_other_client_models_run_on_the_vmap_engine():
    torch.manual_seed(0)
    template = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh()).double()  # not packable: channels are flattened
    loop, vectorised = _client_sides(0, 4, template=template)
    assert vectorised.engine == "vmap"
    with pytest.raises(UserError, match="grouped"):
        VectorisedClientSide(template, 2, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                             keep_momentum_copies=False, device=CPU, engine="grouped")
    pool, rows = [3, 1], [2, 3]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        crops = [torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(step), dtype=torch.float64)]
        expected_loss, _, _ = _step(loop, crops, pool, rows, scaler, seed=step)
        loss, _, _ = _step(vectorised, crops, pool, rows, scaler, seed=step)
        torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    _assert_same_clients(loop, vectorised, range(4))


def test_fedavg_and_averaged_model_equal_the_loop():
    loop, vectorised = _client_sides(cutlayer=2, num_client=4)
    pool, sizes, runtime = [3, 1], {3: 30, 1: 10}, Runtime(device=CPU)
    averaged_loop = loop.module_with(average_pool(loop, pool, sizes, runtime))
    averaged_vectorised = vectorised.module_with(average_pool(vectorised, pool, sizes, runtime))
    for actual, expected in zip(averaged_vectorised.parameters(), averaged_loop.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    fedavg(loop, pool, sizes, runtime, include_momentum_copies=True)
    fedavg(vectorised, pool, sizes, runtime, include_momentum_copies=True)
    _assert_same_clients(loop, vectorised, range(4))
    first = _weights(vectorised.models, 0)
    for c in range(1, 4):  # every client, in the pool or not, holds the average
        assert all(torch.equal(a, b) for a, b in zip(_weights(vectorised.models, c), first))


def test_checkpoints_move_between_loop_and_vectorised():
    loop, vectorised = _client_sides(cutlayer=1, num_client=4)
    pool, rows = [1, 3], [2, 2]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for side in (loop, vectorised):
        _step(side, _crops(4, seed=0), pool, rows, scaler, seed=1)
        side.set_lr(0.01)
    expected, actual = loop.state_dict(), vectorised.state_dict()
    for key in ("models", "momentum_models"):
        assert len(actual[key]) == len(expected[key]) == 4
        for expected_state, actual_state in zip(expected[key], actual[key]):
            assert list(actual_state) == list(expected_state)
            for name in expected_state:
                torch.testing.assert_close(actual_state[name], expected_state[name], **TOLERANCE)
    for c, (expected_opt, actual_opt) in enumerate(zip(expected["optimizers"], actual["optimizers"])):
        assert actual_opt["param_groups"] == expected_opt["param_groups"]
        assert sorted(actual_opt["state"]) == sorted(expected_opt["state"]) == (list(range(len(expected["models"][0]))) if c in pool else [])
        for index, entry in expected_opt["state"].items():
            torch.testing.assert_close(actual_opt["state"][index]["momentum_buffer"], entry["momentum_buffer"], **TOLERANCE)

    # Vectorised checkpoint -> loop, and both continue identically.
    template = _template(1)
    restored = ClientSide(template, 4, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, keep_momentum_copies=True,
                          device=CPU)
    restored.load_state_dict(copy.deepcopy(actual))
    for side in (restored, vectorised):
        _step(side, _crops(4, seed=2), pool, rows, scaler, seed=3)
    _assert_same_clients(restored, vectorised, range(4))


def test_shared_grad_scaler_unscales_and_skips_only_the_overflowing_client():
    loop, vectorised = _client_sides(cutlayer=1, num_client=4)
    pool, rows = [0, 2, 3], [2, 1, 2]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1) for _ in range(2)]
    for side, scaler in zip((loop, vectorised), scalers):
        _step(side, _crops(5, seed=0), pool, rows, scaler, seed=1)
    _assert_same_clients(loop, vectorised, range(4))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2048.0  # finite step: the scale grew

    before = {c: _weights(vectorised.models, c) for c in range(4)}
    for side, scaler in zip((loop, vectorised), scalers):  # client 2 (rows 2:3) gets an infinite gradient
        _step(side, _crops(5, seed=1), pool, rows, scaler, seed=2, poison_rows=slice(2, 3))
    _assert_same_clients(loop, vectorised, range(4))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 1024.0  # overflow: the scale backed off
    assert all(torch.equal(a, b) for a, b in zip(_weights(vectorised.models, 2), before[2]))
    assert not torch.equal(_weights(vectorised.models, 0)[0], before[0][0])


def test_a_step_never_waits_for_the_host(monkeypatch):
    _, vectorised = _client_sides(cutlayer=2, num_client=5)
    pool, rows = [4, 1, 2], [1, 3, 2]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    crops = _crops(6, seed=0)
    _step(vectorised, crops, pool, rows, scaler, seed=1)  # builds and caches the index plans

    def no_sync(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside a client step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    vectorised.zero_grad(pool)
    smashed = vectorised.forward(crops, pool, rows)
    vectorised.momentum_forward(crops, pool, rows)
    vectorised.backward([torch.ones_like(s) for s in smashed])
    vectorised.step(pool, scaler)
    vectorised.update_momentum_copies(pool, KEY_MOMENTUM)


TRAINER_CASES = {
    "moco_equal_rows": (moco_trainer, ["--num_client", "3"]),
    "moco_hetero_subset_pool": (moco_trainer, ["--num_client", "4", "--hetero", "--client_sample_ratio", "0.75"]),
    "swav_multicrop_hetero": (swav_trainer, ["--num_client", "3", "--hetero", "--nmb_crops", "2", "2",
                                             "--freeze_prototypes_niters", "0"]),
}


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_trainer_steps_are_the_same_with_either_client_side(tmp_path, case):
    build, extra = TRAINER_CASES[case]
    options = ["--batch_size", "4", "--momentum", "0.9", "--weight_decay", "0.0005", *extra]
    loop_trainer, vmap_trainer = build(tmp_path / "loop", *options), build(tmp_path / "vmap", *options)
    loop_side, args = loop_trainer.clients, loop_trainer.args
    keep_copies = loop_trainer.method.client_momentum > 0
    # The vectorised side starts from the loop side's state: the same weights, whatever the template was.
    vmap_trainer.split_step.clients = VectorisedClientSide(loop_side.models[0], args.num_client, lr=args.c_lr,
                                                     momentum=args.momentum, weight_decay=args.weight_decay,
                                                     keep_momentum_copies=keep_copies, device=CPU)
    vmap_trainer.clients.load_state_dict(loop_side.state_dict())
    batch = _train_side_by_side(loop_trainer, vmap_trainer, steps=2)
    if "--hetero" in extra:
        assert len(set(batch.rows_per_client)) > 1
    if "--client_sample_ratio" in extra:
        assert len(loop_trainer.data.loaders.train.pool(0)) < args.num_client
    _assert_same_clients(loop_side, vmap_trainer.clients, range(args.num_client), TRAINER_TOLERANCE)
    for actual, expected in zip(vmap_trainer.method.server.parameters(), loop_trainer.method.server.parameters()):
        torch.testing.assert_close(actual, expected, **TRAINER_TOLERANCE)
    _assert_same_server(loop_trainer, vmap_trainer)


def _train_side_by_side(expected, actual, steps: int, dtype: torch.dtype = torch.float32):
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


def _assert_same_server(expected, actual, tolerance=TRAINER_TOLERANCE) -> None:
    """Both trainers' server methods hold the same tensors (weights, momentum encoder, queue, prototypes)."""
    for value, expected_value in zip(actual.method.state_dict().values(), expected.method.state_dict().values()):
        torch.testing.assert_close(value, expected_value, **tolerance)


def _in_float64(trainer) -> None:
    """The trainer's server method and client side converted to float64 (same weights, same layout)."""
    trainer.method.double()  # in place: the server optimizer keeps its parameters
    side, args = trainer.clients, trainer.args
    template = copy.deepcopy(side.models[0]).double()
    options = dict(lr=args.c_lr, momentum=args.momentum, weight_decay=args.weight_decay,
                   keep_momentum_copies=len(side.momentum_models) > 0, device=CPU,
                   memory_format=trainer.split_step.memory_format)
    if isinstance(side, VectorisedClientSide):
        converted = VectorisedClientSide(template, args.num_client, engine=side.engine, **options)
    else:
        converted = ClientSide(template, args.num_client, **options)
    converted.load_state_dict(side.state_dict())
    trainer.split_step.clients = converted


@pytest.mark.parametrize("build, client_exec", [(moco_trainer, "vmap"), (moco_trainer, "loop"), (swav_trainer, "vmap")],
                         ids=["moco_vmap", "moco_loop", "swav_vmap"])
def test_channels_last_trains_like_the_default_layout(tmp_path, build, client_exec):
    # In float64: in float32 the layouts' summation orders differ by rounding (2e-6 in the smashed data), and with
    # MocoSFL's initialisation (residual branches live from the start) a server ReLU input within that rounding of
    # zero (-3e-6 in float64 on the SwAV batch here) switches sides in one layout and not the other, which moves a
    # server kernel's gradient by 0.5 % at once. Neither layout is wrong there; in float64 no input is that close,
    # so the layouts must agree to float64 rounding, while a layout that computed something else would not.
    options = ["--num_client", "3", "--batch_size", "4", "--client_exec", client_exec]
    default, nhwc = build(tmp_path / "nchw", *options), build(tmp_path / "nhwc", *options, "--channels_last")
    server_kernels = [p for p in nhwc.method.parameters() if p.dim() == 4]
    assert server_kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in server_kernels)
    for trainer in (default, nhwc):
        _in_float64(trainer)
    assert all(p.dtype == torch.float64 and (p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last))
               for p in nhwc.method.parameters())
    _train_side_by_side(default, nhwc, steps=2, dtype=torch.float64)
    _assert_same_clients(default.clients, nhwc.clients, range(3), FLOAT64_TRAINER_TOLERANCE)
    _assert_same_server(default, nhwc, FLOAT64_TRAINER_TOLERANCE)
