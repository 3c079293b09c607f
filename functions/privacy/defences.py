"""Privacy defences of the smashed data, as hooks on the split step, chosen by name (--defence).

A defence is a small class registered by name (`@register_defence("name")`), built from a typed view of the run
options (`options_type`, a dataclass whose fields are option names) and the run's setting (`DefenceSetting`), with
`state_dict`/`load_state_dict` for what it learns (the Trainer checkpoints it as the part "defence.<name>").

Its hook, `client_gradients`, is called by the step once the server's gradients are known (steps that send
gradients to the clients only), with the step's smashed data, the crops the clients encoded and each client's
rows; it returns the extra gradient of each crop's smashed data that the clients receive with the server's, and
the step's statistics (logged like the method's). The built-in defence is ResSFL (functions.privacy.ressfl, also
chosen by --enable_ressfl). A defence defined elsewhere (a test, a notebook) is known once its module has been
imported.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from functions.core.checkpoint import Checkpointed
from functions.core.errors import UserError
from functions.core.options import typed_options
from functions.core.registry import Registry

# --enable_ressfl is the older spelling of --defence ressfl.
RESSFL_DEFENCE = "ressfl"


@dataclass(frozen=True)
class DefenceSetting:
    """What a defence is built for: a client part (client 0's weights; a copy), the side of the images of the
    method's first trainable crop, the dataset's normalisation, the device, and whether it runs under torchrun."""

    client: nn.Module
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    distributed: bool = False


@dataclass(frozen=True)
class SmashedStep:
    """One step's smashed data as a defence sees it, after the server's gradients are known.

    smashed[k], images[k], server_gradients[k]: the k-th trainable crop's smashed data (the server's inputs, rows
    grouped by client in pool order), the normalised images the clients encoded into it, and the server's gradient
    of it (None where that crop sends none back; scaled by the fp16 loss scale, as the clients receive it)."""

    smashed: Sequence[Tensor]
    images: Sequence[Tensor]
    server_gradients: Sequence[Tensor | None]
    rows_per_client: Sequence[int]
    epoch: int
    row_share: float = 1.0  # this process's fraction of the step's rows (torchrun)


class PrivacyDefence(Checkpointed):
    """A defence of the clients' smashed data; subclass, implement `client_gradients`, register it."""

    name: ClassVar[str] = ""
    options_type: ClassVar[type | None] = None  # a dataclass of the run options it reads; None: it reads none

    def __init__(self, options: object, setting: DefenceSetting) -> None:
        self.options = options
        self.setting = setting

    def client_gradients(self, step: SmashedStep) -> tuple[list[Tensor | None], dict[str, Tensor]]:
        """The extra gradient of each crop's smashed data the clients receive (None: none; unscaled, in the
        smashed data's dtype) and the step's statistics (detached scalars)."""
        raise NotImplementedError


DEFENCES: Registry[type[PrivacyDefence]] = Registry(PrivacyDefence, "--defence", "defences")
# Class decorator: make a PrivacyDefence known as `name`.
register_defence = DEFENCES.register
defence_class = DEFENCES.lookup


def selected_defences(defence: Sequence[str] | None, enable_ressfl: bool) -> list[str]:
    """The defences a run's options select, in the order given: --defence (default none), to which --enable_ressfl
    adds ressfl; --enable_ressfl with a --defence list without ressfl is refused."""
    if defence is None:
        names = [RESSFL_DEFENCE] if enable_ressfl else []
    elif enable_ressfl and RESSFL_DEFENCE not in defence:
        raise UserError(f"--enable_ressfl selects --defence {RESSFL_DEFENCE}, which --defence {' '.join(defence)} "
                        f"leaves out; add {RESSFL_DEFENCE} to --defence or drop --enable_ressfl")
    else:
        names = list(defence)
    if len(set(names)) < len(names):
        raise UserError(f"--defence {' '.join(names)} names a defence twice")
    for name in names:
        defence_class(name)
    return names


def build_defences(args: argparse.Namespace, setting_of: Callable[[], DefenceSetting]) -> list[PrivacyDefence]:
    """The defences the run options select, each built from its typed options and the run's setting (asked for
    once, only when a defence is selected)."""
    names = selected_defences(getattr(args, "defence", None), args.enable_ressfl)
    setting = setting_of() if names else None
    defences = []
    for name in names:
        defence = defence_class(name)
        options = typed_options(defence.options_type, args) if defence.options_type is not None else None
        defences.append(defence(options, setting))
    return defences
