"""The shared input checks: the one-pass finiteness test and the per-sample RMS norm."""

import math

import pytest
import torch

from equilibria._checks import _all_finite, check_finite, rms_norm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_finds_one_bad_element_anywhere(dtype, bad):
    # Sizes with and without a vector-width tail; the bad value at the first, a middle and
    # the last position (the reductions are vectorised: every lane must see it).
    generator = torch.Generator().manual_seed(0)
    for size in (1, 7, 64, 1000, 4099):
        for position in {0, size // 2, size - 1}:
            values = torch.randn(size, generator=generator).to(dtype)
            assert _all_finite(values)
            values[position] = bad
            assert not _all_finite(values), (size, position)


def test_all_finite_other_kinds():
    assert _all_finite(torch.zeros(0, 3))
    assert _all_finite(torch.arange(5))  # integers are always finite
    z = torch.randn(3, 4, dtype=torch.complex64)
    assert _all_finite(z)
    z[1, 2] = complex(0.0, math.inf)
    assert not _all_finite(z)
    # Large finite values of both signs: no overflow in the test itself.
    assert _all_finite(torch.tensor([-3e38, 3e38], dtype=torch.float32))
    # A strided view is checked over its own elements only.
    base = torch.randn(4, 6)
    base[:, 5] = math.nan
    assert _all_finite(base[:, :5])
    assert not _all_finite(base.t())


def test_check_finite_names_the_samples():
    z = torch.randn(5, 3)
    z[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"z0 contains inf or NaN \(samples \[3\]\)"):
        check_finite("z0", z)
    check_finite("z0", torch.randn(5, 3))


def test_rms_norm_matches_definition_and_has_zero_gradient_at_zero():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    expected = x.reshape(4, -1).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms_norm(x), expected, rtol=1e-15, atol=0)
    assert torch.equal(rms_norm(torch.zeros(2, 0)), torch.zeros(2))
    zero = torch.zeros(2, 3, requires_grad=True)
    rms_norm(zero).sum().backward()
    assert torch.equal(zero.grad, torch.zeros(2, 3))
