"""The data of a run: a run longer than the clients' sample streams can address is refused before it starts."""
from __future__ import annotations

import pytest
from sfl_helpers import moco_trainer

from functions.core.errors import UserError


def test_a_local_epoch_beyond_the_sample_streams_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"exceed the 1099511627776 samples a client's stream can address; lower "
                                        r"--num_epoch or --local_epoch 100000000000"):
        moco_trainer(tmp_path, "--scheme", "fl", "--local_epoch", "100000000000", "--num_client", "2",
                     "--client_exec", "loop")
