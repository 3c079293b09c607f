"""FedAvg rules: what the clients load after each FedAvg, chosen by name (--fedavg_rule).

A rule is a small class registered by name (`@register_fedavg_rule("name")`), built from a typed view of the run
options (`options_type`, a dataclass whose fields are option names), with `state_dict`/`load_state_dict` for what it
keeps between aggregations (the Trainer checkpoints it as the part "fedavg.<name>"). functions.sfl.fedavg computes
the pool's data-size-weighted average and asks the rule, through two hooks, what every client and what the pool's
clients load:

- `global_state(average)`: the state every client loads (plain FedAvg: the average itself);
- `mix(...)`, for a `personalised` rule only: the weights the pool's own clients keep instead, given each one's
  divergence from the global state.

The built-in rules: `fedavg` (the data-size-weighted FedAvg) and `divergence_aware` (MocoSFL's FedEMA, also chosen by
--divergence_aware). A rule defined elsewhere (a test, a notebook) is known once its module has been imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from functions.core.checkpoint import Checkpointed
from functions.core.distributed import Runtime, all_reduce_sum
from functions.core.errors import UserError
from functions.core.options import typed_options
from functions.core.registry import Registry

DEFAULT_FEDAVG_RULE = "fedavg"
# --divergence_aware is the older spelling of --fedavg_rule divergence_aware.
DIVERGENCE_AWARE_RULE = "divergence_aware"


@dataclass(frozen=True)
class FedAvgOptions:
    """The run options the built-in rules read."""

    num_client: int
    div_lambda: float = 1.0
    compat: str = "none"

    @property
    def mocosfl_compat(self) -> bool:
        """Whether the rule reproduces MocoSFL's code (--compat mocosfl)."""
        return self.compat == "mocosfl"


class FedAvgRule(Checkpointed):
    """A FedAvg rule; the hooks' defaults are plain FedAvg's: every client loads the pool's average, nothing is
    kept. Subclass, override what the rule changes, register it."""

    name: ClassVar[str] = ""
    options_type: ClassVar[type] = FedAvgOptions
    # Whether the pool's clients keep their own mix (`mix`) instead of the global state.
    personalised: ClassVar[bool] = False

    def __init__(self, options: object) -> None:
        self.options = options

    def global_state(self, average: dict[str, Tensor]) -> dict[str, Tensor]:
        """The state every client loads, given the pool's weighted average (every rank sees the same)."""
        return average

    def mix(self, client_ids: Sequence[int], stacked: dict[str, Tensor], average: dict[str, Tensor],
            runtime: Runtime, divergence: Tensor, pool: Sequence[int]) -> dict[str, Tensor]:
        """A personalised rule's weights of these clients (this process's pool clients, stacked in client_ids order)
        after the aggregation, given the global state and each client's summed divergence from it."""
        raise NotImplementedError(f"FedAvg rule {self.name!r} is not personalised")


FEDAVG_RULES: Registry[type[FedAvgRule]] = Registry(FedAvgRule, "--fedavg_rule", "rules")
# Class decorator: make a FedAvgRule known as `name`.
register_fedavg_rule = FEDAVG_RULES.register
fedavg_rule_class = FEDAVG_RULES.lookup


def selected_fedavg_rule(fedavg_rule: str | None, divergence_aware: bool) -> str:
    """The rule a run's options select: --fedavg_rule (default fedavg), which --divergence_aware sets to
    divergence_aware; --divergence_aware with another --fedavg_rule is refused."""
    if divergence_aware and fedavg_rule not in (None, DIVERGENCE_AWARE_RULE):
        raise UserError(f"--divergence_aware selects --fedavg_rule {DIVERGENCE_AWARE_RULE}, not {fedavg_rule}; "
                        "give one of the two")
    name = DIVERGENCE_AWARE_RULE if divergence_aware else (fedavg_rule or DEFAULT_FEDAVG_RULE)
    fedavg_rule_class(name)
    return name


def build_fedavg_rule(args: argparse.Namespace) -> FedAvgRule:
    """The FedAvg rule the run options select, built from its typed options."""
    rule = fedavg_rule_class(selected_fedavg_rule(getattr(args, "fedavg_rule", None), args.divergence_aware))
    return rule(typed_options(rule.options_type, args))


@register_fedavg_rule(DEFAULT_FEDAVG_RULE)
class DataSizeWeightedFedAvg(FedAvgRule):
    """FedAvg (McMahan et al., 2017): every client loads the pool's average weighted by the clients' data sizes."""


@register_fedavg_rule("divergence_aware")
class DivergenceAwareAveraging(FedAvgRule):
    """Divergence-aware FedAvg as MocoSFL means it (FedEMA, Zhuang et al., 2022): each pool client keeps
    mu * its own weights + (1 - mu) * the average, one mu per client, mu = min(lambda * divergence, 1), the divergence
    being the sum over its learned tensors of the L2 norm of its difference from the average (BatchNorm statistics
    left out of the sum, mixed like the weights); lambda starts at --div_lambda and, at a client's first
    aggregation, becomes mu / divergence, so that the same divergence keeps that mu (FedEMA's auto-scaler). Clients
    outside the pool take the average.

    --compat mocosfl reproduces MocoSFL's code: it assigns each mix into a copy of the client's
    state dict, so the pool's clients keep their own weights (no averaging at all), and its auto-scaler rescales
    only the first client of the first aggregation.
    """

    personalised = True

    def __init__(self, options: FedAvgOptions) -> None:
        super().__init__(options)
        self.num_client = options.num_client
        self.mocosfl_compat = options.mocosfl_compat
        self.lambdas = torch.full((options.num_client,), float(options.div_lambda), dtype=torch.float64)
        # Whether each client's first aggregation is behind it.
        self.rescaled = torch.zeros(options.num_client, dtype=torch.bool)
        self.auto_scaler = True  # --compat mocosfl: MocoSFL's one flag, cleared by the first aggregation

    def mix(self, client_ids: Sequence[int], stacked: dict[str, Tensor], average: dict[str, Tensor],
            runtime: Runtime, divergence: Tensor, pool: Sequence[int]) -> dict[str, Tensor]:
        """The weights of these clients (this process's pool clients) after the aggregation, given their summed
        divergences (in client_ids order); updates the lambdas."""
        index = torch.as_tensor(list(client_ids), dtype=torch.long)
        divergence = divergence.double().cpu()
        lambdas = self.lambdas[index]
        mu = (lambdas * divergence).clamp(max=1.0)
        if self.mocosfl_compat:
            if self.auto_scaler and pool:
                first = [j for j, client in enumerate(client_ids) if client == pool[0]]
                if first:
                    lambdas[first[0]] = mu[first[0]] / divergence[first[0]]
                self.auto_scaler = False
            self._store(index, lambdas, torch.zeros_like(index, dtype=torch.bool), runtime)
            return {name: rows.clone() for name, rows in stacked.items()}
        first = ~self.rescaled[index]
        rescaled = torch.where(divergence > 0, mu / divergence.clamp_min(1e-300), lambdas)
        self._store(index, torch.where(first, rescaled, lambdas), torch.ones_like(first), runtime)
        mixed = {}
        for name, rows in stacked.items():
            mean = average[name].to(rows.device, rows.dtype).unsqueeze(0)
            if not rows.is_floating_point():
                mixed[name] = mean.expand_as(rows).clone()  # counters take the average's
                continue
            weight = mu.to(rows.device, rows.dtype).view(-1, *([1] * (rows.dim() - 1)))
            mixed[name] = weight * rows + (1 - weight) * mean
        return mixed

    def _store(self, index: Tensor, lambdas: Tensor, rescaled: Tensor, runtime: Runtime) -> None:
        """Keep the new lambdas; under torchrun every rank gets every rank's (each rank mixed its own clients)."""
        if not runtime.is_distributed:
            self.lambdas[index] = lambdas
            self.rescaled[index] |= rescaled
            return
        values = torch.zeros(self.num_client, 3, dtype=torch.float64)
        values[index, 0], values[index, 1], values[index, 2] = lambdas, rescaled.double(), 1.0
        values = all_reduce_sum(values.to(runtime.device)).cpu()
        present = values[:, 2] > 0
        self.lambdas[present] = values[present, 0]
        self.rescaled |= values[:, 1] > 0

    def state_dict(self) -> dict:
        return {"lambdas": self.lambdas.clone(), "rescaled": self.rescaled.clone(), "auto_scaler": self.auto_scaler}

    def load_state_dict(self, state: dict) -> None:
        if "lambdas" not in state:
            raise UserError("the checkpoint's divergence-aware FedAvg kept one lambda per layer (an earlier version); "
                            "this version keeps one per client, as MocoSFL: start a new --output_dir")
        self.lambdas = state["lambdas"].clone().double()
        self.rescaled = state["rescaled"].clone().bool()
        self.auto_scaler = bool(state["auto_scaler"])
