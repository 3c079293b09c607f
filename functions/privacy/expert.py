"""--initialze_path and --load_server: start a run's client parts (and, with --load_server, its server part) from an
earlier run, as MocoSFL does with the ResSFL expert (a client part trained attacker-aware, see functions.privacy.ressfl).

The folder is either a run of this project (its checkpoint_best.pt, else checkpoint_last.pt: the clients' average
and the server) or a MocoSFL run (checkpoint_c_best.tar and checkpoint_s_best.tar, plain state dicts keyed by
MocoSFL's layer indices, read through a key mapping onto this project's unit names).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from functions.core.checkpoint import (
    BEST_CHECKPOINT_NAME,
    CHECKPOINT_NAME,
    check_checkpoint_layout,
    first_non_finite,
    load_checkpoint,
)
from functions.core.errors import UserError
from functions.core.options import OptionGroup
from models.bottleneck import CLIENT_BOTTLENECK, SERVER_BOTTLENECK
from models.split import BACKBONE_PREFIX, SplitModel, architecture

logger = logging.getLogger(__name__)

MOCOSFL_CLIENT_FILE = "checkpoint_c_best.tar"
MOCOSFL_SERVER_FILE = "checkpoint_s_best.tar"
SERVER_PREFIX = "server."  # the server part's keys inside a ServerMethod's state dict
_MOCOSFL_NORM = re.compile(r"^bn(\d)")


def _mocosfl_unit_key(unit: str, rest: str) -> str:
    """One ResNet layer key of MocoSFL (after its unit index) in this project's naming: bnN -> normN, the stem's
    conv1/bn1 -> conv/norm; convolutions and shortcuts keep their names."""
    if unit == "stem":
        rest = rest.replace("conv1.", "conv.", 1).replace("bn1.", "norm.", 1)
    return unit + "." + _MOCOSFL_NORM.sub(r"norm\1", rest)


def _mocosfl_units(arch: str) -> tuple[str, ...]:
    """The units of `arch`, whose MocoSFL files this module can read (the ResNets: same layer order and names)."""
    entry = architecture(arch)
    if not entry.name.startswith("ResNet"):
        raise UserError(f"--initialze_path: MocoSFL client files are read for the ResNets only, not --arch {arch}; "
                        "start from a run of this project instead")
    return entry.unit_names


def _renamed(state: Mapping[str, torch.Tensor], part: str,
             rename: Callable[[int, str], str]) -> dict[str, torch.Tensor]:
    """`state` with each MocoSFL key `<index>.<rest>` replaced by rename(index, rest); a UserError for other keys."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit():
            raise UserError(f"--initialze_path: {key} is not a MocoSFL {part} key (<layer index>.<name>)")
        mapped[rename(int(index), rest)] = value
    return mapped


def mocosfl_client_state(state: Mapping[str, torch.Tensor], arch: str, cutlayer: int) -> dict[str, torch.Tensor]:
    """A MocoSFL client part (keys `<index>.<layer>`: units 0..cutlayer-1, then the bottleneck's layers) with this
    project's keys (`stem.conv.weight`, `layer1_0.norm1.bias`, `client_bottleneck.0.weight`, ...)."""
    units = _mocosfl_units(arch)

    def rename(position: int, rest: str) -> str:
        if position < cutlayer:
            return _mocosfl_unit_key(units[position], rest)
        return f"{CLIENT_BOTTLENECK}.{position - cutlayer}.{rest}"

    return _renamed(state, "client", rename)


def mocosfl_server_state(state: Mapping[str, torch.Tensor], arch: str, cutlayer: int,
                         server_bottleneck_layers: int) -> dict[str, torch.Tensor]:
    """A MocoSFL server part (keys `<index>.<layer>`: the bottleneck's layers, the remaining units, a parameter-free
    pooling view, then the projection head) with this project's server keys."""
    units = _mocosfl_units(arch)[cutlayer:]

    def rename(position: int, rest: str) -> str:
        if position < server_bottleneck_layers:
            return f"{BACKBONE_PREFIX}{SERVER_BOTTLENECK}.{position}.{rest}"
        if position - server_bottleneck_layers < len(units):
            return BACKBONE_PREFIX + _mocosfl_unit_key(units[position - server_bottleneck_layers], rest)
        return f"head.{rest}"  # after the units and the pooling view: the classifier (MoCo's projection)

    return _renamed(state, "server", rename)


def _fit(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str) -> None:
    """Load `state` into `module` exactly: same keys, same shapes; otherwise one line saying what differs."""
    own = module.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        differs = (f"it lacks {missing[0]}" if missing else "") + (" and " if missing and unexpected else "") + \
                  (f"it has {unexpected[0]}, which this run's model does not" if unexpected else "")
        raise UserError(f"--initialze_path: the {what} does not fit this run's model ({differs}){hint}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"--initialze_path: the {what}'s {key} has shape {tuple(value.shape)}, this run's model "
                            f"{tuple(own[key].shape)}{hint}")
    module.load_state_dict({key: value.to(own[key].dtype) for key, value in state.items()})


def _mocosfl_hint(state: Mapping[str, torch.Tensor]) -> str:
    """What a MocoSFL client file was trained with (its cut, its bottleneck), as a hint for mismatches."""
    # Units hold named layers (0.conv1.weight); the bottleneck's layers are plain (1.weight).
    unit_indices = {int(key.split(".")[0]) for key in state if key.count(".") >= 2 and key.split(".")[0].isdigit()}
    if not unit_indices:
        return ""
    cut = max(unit_indices) + 1
    first_layer = state.get(f"{cut}.weight")
    if first_layer is None:
        return f"; the file holds a client part at --cutlayer {cut} and no bottleneck"
    channels = first_layer.shape[0]
    return (f"; the file holds a client part at --cutlayer {cut} and a bottleneck of {channels} channels "
            f"(--bottleneck_option C{channels}S<stride>)")


@dataclass(frozen=True)
class InitialWeightsOptions(OptionGroup):
    """The run options that start a run from an earlier one's weights."""

    initialze_path: str   # the earlier run's folder (this project's or MocoSFL's)
    arch: str             # the architecture, for MocoSFL's layer keys
    cutlayer: int         # the cut, for MocoSFL's layer keys
    load_server: bool     # also the server part


def load_initial_weights(options: InitialWeightsOptions, split: SplitModel) -> None:
    """Load --initialze_path's client part into `split.client` (and with --load_server its server part into
    `split.server`), before the clients and the server method copy them."""
    folder = Path(options.initialze_path)
    if not folder.is_dir():
        raise UserError(f"--initialze_path {folder} is not a folder (give an earlier run's --output_dir)")
    if (folder / MOCOSFL_CLIENT_FILE).is_file():
        _load_mocosfl(options, split, folder)
        return
    for name in (BEST_CHECKPOINT_NAME, CHECKPOINT_NAME):
        if (folder / name).is_file():
            _load_own_run(options, split, folder / name)
            return
    raise UserError(f"--initialze_path {folder} holds neither a run of this project ({BEST_CHECKPOINT_NAME} or "
                    f"{CHECKPOINT_NAME}) nor a MocoSFL run ({MOCOSFL_CLIENT_FILE})")


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A MocoSFL state dict file (tensors only), or one line saying why it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"--initialze_path: cannot read {path} ({type(error).__name__}); is it a complete file?") from None
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"--initialze_path: {path} is not a state dict of tensors")
    return dict(state)


def _load_mocosfl(options: InitialWeightsOptions, split: SplitModel, folder: Path) -> None:
    """The client (and server) parts of a MocoSFL run folder."""
    client_file = _torch_file(folder / MOCOSFL_CLIENT_FILE)
    hint = _mocosfl_hint(client_file)
    _fit(split.client, mocosfl_client_state(client_file, options.arch, options.cutlayer), "MocoSFL client part",
         hint)
    logger.info(f"client parts start from MocoSFL's {folder / MOCOSFL_CLIENT_FILE}")
    if options.load_server:
        server_path = folder / MOCOSFL_SERVER_FILE
        if not server_path.is_file():
            raise UserError(f"--load_server: {folder} holds no {MOCOSFL_SERVER_FILE}; run without --load_server")
        decoder = getattr(split.server.backbone, SERVER_BOTTLENECK, None)
        mapped = mocosfl_server_state(_torch_file(server_path), options.arch, options.cutlayer,
                                      len(decoder) if decoder is not None else 0)
        _fit(split.server, mapped, "MocoSFL server part", "")
        logger.info(f"the server part starts from MocoSFL's {server_path}")


def _load_own_run(options: InitialWeightsOptions, split: SplitModel, path: Path) -> None:
    """The clients' average (and the server part) of a checkpoint of this project."""
    state = load_checkpoint(path)
    check_checkpoint_layout(state, f"--initialze_path: {path}", "start from another run")
    broken = first_non_finite({"method": state["method"], "clients": state["clients"]["models"]})
    if broken is not None:
        raise UserError(f"--initialze_path: {path} holds non-finite weights ({broken}); start from a healthy run")
    hint = ""
    saved = state.get("args", {})
    if isinstance(saved, Mapping):
        hint = (f"; that run used --arch {saved.get('arch')} --cutlayer {saved.get('cutlayer')} "
                f"--bottleneck_option {saved.get('bottleneck_option', 'None')}")
    models = state["clients"]["models"]
    average = {key: torch.stack([model[key].float() for model in models]).mean(dim=0) for key in models[0]}
    _fit(split.client, average, f"client part in {path}", hint)
    logger.info(f"client parts start from the average of the {len(models)} clients in {path}")
    if options.load_server:
        server = {key[len(SERVER_PREFIX):]: value for key, value in state["method"].items()
                  if key.startswith(SERVER_PREFIX)}
        _fit(split.server, server, f"server part in {path}", hint)
        logger.info(f"the server part starts from {path}")
