"""The loop client engine: each client's layers in turn, gradient rows back to the clients that sent them."""
from __future__ import annotations

import copy

import torch
from sfl_helpers import three_different_clients

from functions.sfl.clients.loop import query_index


def test_gradient_rows_return_to_the_clients_that_sent_them():
    clients = three_different_clients()
    rows = [1, 3, 2]
    data = [torch.randn(6, 4), torch.randn(6, 4)]  # two crops, rows grouped by client
    smashed = clients.forward(data, [0, 1, 2], rows)
    server_inputs = [s.detach().requires_grad_(True) for s in smashed]
    server_weights = [torch.randn(6, 3), torch.randn(6, 3)]
    sum((x * w).sum() ** 2 for x, w in zip(server_inputs, server_weights)).backward()
    clients.backward([x.grad for x in server_inputs])

    offsets = query_index(rows)
    assert offsets == [0, 1, 4, 6]
    for client in range(3):
        model = copy.deepcopy(clients.models[client])
        model.zero_grad()
        begin, end = offsets[client], offsets[client + 1]
        # The row gradients the server computed for this client's rows, pushed through this client alone.
        for crop, x, in zip(data, server_inputs):
            model(crop[begin:end]).backward(x.grad[begin:end])
        assert torch.allclose(clients.models[client].weight.grad, model.weight.grad, atol=1e-6)
