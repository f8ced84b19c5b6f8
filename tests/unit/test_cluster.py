"""Ray addresses the jobs accept, and what they become for ``ray.init`` (no Ray started)."""

from __future__ import annotations

import pytest

from pipeline.cluster import AddressError, resolve_address


def test_ray_addresses():
    assert resolve_address(None) == "local"
    assert resolve_address("10.1.2.3:6379") == "10.1.2.3:6379"
    assert resolve_address("ray://head:10001") == "ray://head:10001"
    # A dashboard URL is translated only for a Ray running here (the stack's: tests/integration/test_stack.py).
    for url in ("http://10.1.2.3:8265", "http://127.0.0.1:1"):
        with pytest.raises(AddressError, match="ray job submit"):
            resolve_address(url)
