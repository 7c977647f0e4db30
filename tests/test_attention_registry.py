"""The attention registry: one name <-> phi table, aliases, and a clear error for anything else."""
import pytest
from torch import nn

from nets.attention import (BAM, CBAM, CCNet, DANet, ECA, GAM, SE, SGE, CoordAttention, PolarizedSelfAttention,
                            ShuffleAttention, attention_name, attention_phi, build_attention)

NAMES = ["se", "cbam", "eca", "ca", "sa", "sge", "bam", "psa", "gam", "danet", "ccnet"]

EXPECTED_TYPES = {1: SE, 2: CBAM, 3: ECA, 4: CoordAttention, 5: ShuffleAttention, 6: SGE, 7: BAM,
                  8: PolarizedSelfAttention, 9: GAM, 10: DANet, 11: CCNet}


@pytest.mark.parametrize("phi", range(12))
def test_lookup_by_int_digit_string_and_name(phi):
    expected = EXPECTED_TYPES.get(phi, nn.Identity)
    assert type(build_attention(phi, 64)) is expected
    assert type(build_attention(str(phi), 64)) is expected
    name = (["none"] + NAMES)[phi]
    assert attention_name(phi) == name
    assert type(build_attention(name.upper(), 64)) is expected
    assert attention_phi(name) == phi and attention_phi(phi) == phi


def test_lookup_aliases_and_case():
    assert type(build_attention("CBAM", 64)) is CBAM
    assert type(build_attention(" Cbam ", 64)) is CBAM
    assert type(build_attention("4", 64)) is CoordAttention
    assert type(build_attention("coord", 64)) is CoordAttention
    assert type(build_attention("shuffle", 64)) is ShuffleAttention
    assert type(build_attention("none", 64)) is nn.Identity
    assert type(build_attention(0, 64)) is nn.Identity
    assert attention_phi("ca") == 4
    assert attention_phi("coord") == 4
    assert attention_phi("shuffle") == 5


@pytest.mark.parametrize("bad", ["foo", 12, "12", -1, "se2"])
def test_unknown_attention_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        build_attention(bad, 64)
    msg = str(info.value)
    for name in ("cbam", "ca", "ccnet", "none"):
        assert name in msg
    with pytest.raises(ValueError):
        attention_phi(bad)
