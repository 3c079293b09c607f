"""Vectorised client side (--client_exec vmap) against the loop over per-client modules: same numbers, same checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from engine_comparison import (
    CPU,
    KEY_MOMENTUM,
    LR,
    MOMENTUM,
    TOLERANCE,
    TRAINER_TOLERANCE,
    WEIGHT_DECAY,
    assert_same_clients,
    assert_same_server,
    assert_same_step,
    client_sides,
    client_template,
    client_weights_of,
    engine_step,
    random_crops,
    train_side_by_side,
)
from sfl_helpers import moco_trainer, swav_trainer
from torch import nn

from functions.core.distributed import Runtime
from functions.core.errors import UserError
from functions.sfl.clients.loop import ClientSide
from functions.sfl.clients.vmap import VectorisedClientSide
from functions.sfl.fedavg import average_pool, fedavg
from models.split import build_split_model

FLOAT64_TRAINER_TOLERANCE = dict(rtol=1e-7, atol=1e-8)  # a Trainer converted to float64 (the losses stay float32)


pytestmark = pytest.mark.usefixtures("one_thread")


ROWS = {"equal": [2, 2, 2], "unequal": [2, 1, 3], "many_counts": [1, 2, 3, 4, 5, 6]}


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("cutlayer", [1, 2])
@pytest.mark.parametrize("rows_name", sorted(ROWS))
def test_vectorised_steps_equal_the_loop_and_leave_other_clients_alone(cutlayer, rows_name, engine):
    rows = ROWS[rows_name]
    num_client = len(rows) + 2
    pool = [num_client - 1, 0, *range(2, len(rows))][: len(rows)]  # a strict subset, not in id order
    loop, vectorised = client_sides(cutlayer, num_client, engine)
    assert vectorised.engine == engine
    outside = sorted(set(range(num_client)) - set(pool))
    before = {c: client_weights_of(vectorised.models, c) for c in outside}
    before_copies = {c: client_weights_of(vectorised.momentum_models, c) for c in outside}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(3):
        crops = random_crops(sum(rows), seed=step)
        expected = engine_step(loop, crops, pool, rows, scaler, seed=10 + step)
        assert_same_step(engine_step(vectorised, crops, pool, rows, scaler, seed=10 + step), expected, pool)
        assert_same_clients(loop, vectorised, pool)
    crops = random_crops(sum(rows), seed=99)
    for actual, expected in zip(vectorised.momentum_forward(crops, pool, rows), loop.momentum_forward(crops, pool, rows)):
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    for c in outside:  # neither weight decay nor momentum copies may touch clients outside the pool
        assert all(torch.equal(a, b) for a, b in zip(client_weights_of(vectorised.models, c), before[c]))
        assert all(torch.equal(a, b) for a, b in zip(client_weights_of(vectorised.momentum_models, c), before_copies[c]))


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("image_size", [64, 224])
def test_strided_stems_of_64_and_224_pixel_images_run_vectorised(engine, image_size):
    # The stem of 64-pixel images is a 3x3 stride-2 convolution, of 224-pixel ones a 7x7 stride-2 one: both packs
    # keep the convolution's own kernel, stride and padding.
    torch.manual_seed(0)
    template = build_split_model("ResNet18", 2, width=4, image_size=image_size).client.double()
    assert template.stem.conv.stride == (2, 2)
    loop, vectorised = client_sides(2, 3, engine, template=template)
    assert vectorised.engine == engine
    pool, rows = [2, 0], [1, 2]
    generator = torch.Generator().manual_seed(5)
    crops = [torch.randn(sum(rows), 3, image_size, image_size, generator=generator, dtype=torch.float64)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    expected = engine_step(loop, crops, pool, rows, scaler, seed=3)
    assert_same_step(engine_step(vectorised, crops, pool, rows, scaler, seed=3), expected, pool)
    assert vectorised.forward(crops, pool, rows)[0].shape[-1] == image_size // 2


@pytest.mark.parametrize("cutlayer", [1, 2])
def test_channels_last_gives_the_contiguous_loops_numbers_and_nhwc_smashed_data(cutlayer):
    rows, pool, num_client = [2, 1, 3], [3, 0, 1], 4
    loop, vectorised = client_sides(cutlayer, num_client, "grouped", memory_format=torch.channels_last)
    nhwc_loop = ClientSide(client_template(cutlayer), num_client, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           keep_momentum_copies=True, device=CPU, memory_format=torch.channels_last)
    nhwc_loop.load_state_dict(loop.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc_loop.models[0].parameters() if p.dim() == 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        crops = random_crops(sum(rows), seed=step)
        nhwc_crops = [crop.contiguous(memory_format=torch.channels_last) for crop in crops]
        expected = engine_step(loop, crops, pool, rows, scaler, seed=10 + step)
        for side in (vectorised, nhwc_loop):
            smashed = side.forward(nhwc_crops, pool, rows)
            assert all(s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous() for s in smashed)
            assert_same_step(engine_step(side, nhwc_crops, pool, rows, scaler, seed=10 + step), expected, pool)
    assert_same_clients(loop, vectorised, range(num_client))
    assert_same_clients(loop, nhwc_loop, range(num_client))


@pytest.mark.parametrize("engine", ["grouped", "vmap"])
@pytest.mark.parametrize("rows, pool", [([3, 1, 2], [2, 3, 1]), ([2, 2, 2, 2], [0, 1, 2, 3])],
                         ids=["unequal_subset", "equal_everyone"])
def test_forward_rows_come_back_in_input_order_for_every_client(engine, rows, pool):
    loop, vectorised = client_sides(cutlayer=2, num_client=4, engine=engine)
    crops = random_crops(sum(rows), seed=5)
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
    loop, vectorised = client_sides(0, 4, template=template)
    assert vectorised.engine == "vmap"
    with pytest.raises(UserError, match="grouped"):
        VectorisedClientSide(template, 2, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                             keep_momentum_copies=False, device=CPU, engine="grouped")
    pool, rows = [3, 1], [2, 3]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(2):
        crops = [torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(step), dtype=torch.float64)]
        expected_loss, _, _ = engine_step(loop, crops, pool, rows, scaler, seed=step)
        loss, _, _ = engine_step(vectorised, crops, pool, rows, scaler, seed=step)
        torch.testing.assert_close(loss, expected_loss, **TOLERANCE)
    assert_same_clients(loop, vectorised, range(4))


def test_checkpoints_move_between_loop_and_vectorised():
    loop, vectorised = client_sides(cutlayer=1, num_client=4)
    pool, rows = [1, 3], [2, 2]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for side in (loop, vectorised):
        engine_step(side, random_crops(4, seed=0), pool, rows, scaler, seed=1)
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
    template = client_template(1)
    restored = ClientSide(template, 4, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, keep_momentum_copies=True,
                          device=CPU)
    restored.load_state_dict(copy.deepcopy(actual))
    for side in (restored, vectorised):
        engine_step(side, random_crops(4, seed=2), pool, rows, scaler, seed=3)
    assert_same_clients(restored, vectorised, range(4))


def test_shared_grad_scaler_unscales_and_skips_only_the_overflowing_client():
    loop, vectorised = client_sides(cutlayer=1, num_client=4)
    pool, rows = [0, 2, 3], [2, 1, 2]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1) for _ in range(2)]
    for side, scaler in zip((loop, vectorised), scalers):
        engine_step(side, random_crops(5, seed=0), pool, rows, scaler, seed=1)
    assert_same_clients(loop, vectorised, range(4))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2048.0  # finite step: the scale grew

    before = {c: client_weights_of(vectorised.models, c) for c in range(4)}
    for side, scaler in zip((loop, vectorised), scalers):  # client 2 (rows 2:3) gets an infinite gradient
        engine_step(side, random_crops(5, seed=1), pool, rows, scaler, seed=2, poison_rows=slice(2, 3))
    assert_same_clients(loop, vectorised, range(4))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 1024.0  # overflow: the scale backed off
    assert all(torch.equal(a, b) for a, b in zip(client_weights_of(vectorised.models, 2), before[2]))
    assert not torch.equal(client_weights_of(vectorised.models, 0)[0], before[0][0])


def test_a_step_never_waits_for_the_host(monkeypatch):
    _, vectorised = client_sides(cutlayer=2, num_client=5)
    pool, rows = [4, 1, 2], [1, 3, 2]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    crops = random_crops(6, seed=0)
    engine_step(vectorised, crops, pool, rows, scaler, seed=1)  # builds and caches the index plans

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
    batch = train_side_by_side(loop_trainer, vmap_trainer, steps=2)
    if "--hetero" in extra:
        assert len(set(batch.rows_per_client)) > 1
    if "--client_sample_ratio" in extra:
        assert len(loop_trainer.data.loaders.train.pool(0)) < args.num_client
    assert_same_clients(loop_side, vmap_trainer.clients, range(args.num_client), TRAINER_TOLERANCE)
    for actual, expected in zip(vmap_trainer.method.server.parameters(), loop_trainer.method.server.parameters()):
        torch.testing.assert_close(actual, expected, **TRAINER_TOLERANCE)
    assert_same_server(loop_trainer, vmap_trainer)


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
    train_side_by_side(default, nhwc, steps=2, dtype=torch.float64)
    assert_same_clients(default.clients, nhwc.clients, range(3), FLOAT64_TRAINER_TOLERANCE)
    assert_same_server(default, nhwc, FLOAT64_TRAINER_TOLERANCE)


def test_fedavg_and_averaged_model_equal_the_loop():
    loop, vectorised = client_sides(cutlayer=2, num_client=4)
    pool, sizes, runtime = [3, 1], {3: 30, 1: 10}, Runtime(device=CPU)
    averaged_loop = loop.module_with(average_pool(loop, pool, sizes, runtime))
    averaged_vectorised = vectorised.module_with(average_pool(vectorised, pool, sizes, runtime))
    for actual, expected in zip(averaged_vectorised.parameters(), averaged_loop.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    fedavg(loop, pool, sizes, runtime, include_momentum_copies=True)
    fedavg(vectorised, pool, sizes, runtime, include_momentum_copies=True)
    assert_same_clients(loop, vectorised, range(4))
    first = client_weights_of(vectorised.models, 0)
    for c in range(1, 4):  # every client, in the pool or not, holds the average
        assert all(torch.equal(a, b) for a, b in zip(client_weights_of(vectorised.models, c), first))
