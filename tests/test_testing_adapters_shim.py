"""The deprecated ``tokenprune.testing_adapters`` path still serves the kit, with a DeprecationWarning."""

from __future__ import annotations

import pytest

from tokenprune.testing import adapters


def test_the_old_path_warns_and_serves_the_same_objects():
    from tokenprune import testing_adapters

    with pytest.warns(DeprecationWarning, match="tokenprune.testing.adapters"):
        check = testing_adapters.check_adapter
    assert check is adapters.check_adapter
    assert set(testing_adapters.__all__) == set(adapters.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        testing_adapters.nope  # noqa: B018
