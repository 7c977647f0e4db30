"""Attention blocks: pinned parameter counts, shapes, dtypes, the semantics each paper defines, the registry."""
import math
import warnings

import pytest
import torch
from torch import nn

from nets.attention import (
    ATTENTION_BLOCKS,
    DANet,
    ECA,
    SGE,
    CrissCrossAttention,
    ShuffleAttention,
    build_attention,
    eca_kernel_size,
)

NAMES = ["se", "cbam", "eca", "ca", "sa", "sge", "bam", "psa", "gam", "danet", "ccnet"]
# parameter counts at C=256, from the papers' official code (the issue's table)
PARAMS_256 = {"se": 8464, "cbam": 8564, "eca": 5, "ca": 6680, "sa": 12, "sge": 128, "bam": 17361,
              "psa": 131328, "gam": 1639680, "danet": 82242, "ccnet": 82241}


def nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make(name, channels, seed=0, **kw):
    torch.manual_seed(seed)
    return build_attention(name, channels, **kw)


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def channel_shuffle(x, groups=2):
    """The official Shuffle Attention channel shuffle."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_at_256(name):
    assert nparams(build_attention(name, 256)) == PARAMS_256[name]


def test_registry_order_and_counts_cover_every_block():
    assert list(ATTENTION_BLOCKS) == NAMES


@pytest.mark.parametrize("key", [0, "0", "none", "NONE", None])
def test_none_is_identity_without_parameters(key):
    block = build_attention(key, 256)
    assert type(block) is nn.Identity
    assert nparams(block) == 0
    x = rand(1, 256, 3, 3)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("channels,k", [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5)])
def test_eca_kernel_size(channels, k):
    assert eca_kernel_size(channels) == k
    conv = ECA(channels).conv
    assert conv.kernel_size == (k,)
    assert conv.padding == ((k - 1) // 2,)
    assert conv.bias is None


# ---------------------------------------------------------------- shapes and modes

@pytest.mark.parametrize("name", ["none", *NAMES])
@pytest.mark.parametrize("channels", [128, 512])
def test_shape_kept_train_and_eval(name, channels):
    block = make(name, channels)
    for shape in [(1, channels, 13, 13), (2, channels, 13, 9), (1, channels, 7, 11)]:
        x = rand(*shape)
        for train in (True, False):
            block.train(train)
            with torch.no_grad():
                out = block(x)
            assert out.shape == x.shape, (name, shape, train)
            assert out.dtype == x.dtype
            assert torch.isfinite(out).all(), (name, shape, train)


@pytest.mark.parametrize("name,groups", [("sa", 48), ("sge", 48)])
def test_groups_lowered_until_they_divide(name, groups):
    # 96 channels: 64 groups do not divide (SA needs 2*groups | C), 48 does
    block = make(name, 96)
    assert block.groups == groups
    assert 96 % (groups * (2 if name == "sa" else 1)) == 0
    for train in (True, False):
        block.train(train)
        x = rand(1, 96, 5, 7)
        assert block(x).shape == x.shape
    # the defaults stand where they divide
    assert make(name, 256).groups == 64
    # and SA with an odd count of channel pairs falls back to fewer groups
    assert ShuffleAttention(2 * 3 * 5).groups == 15
    assert SGE(7).groups == 7


def _autocast_works(dtype) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=dtype):
                y = nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        return y.dtype == dtype
    except Exception:  # noqa: BLE001 - any failure means this torch cannot autocast to dtype on CPU
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", NAMES)
def test_autocast_cpu_finite(name, dtype):
    if not _autocast_works(dtype):
        pytest.skip(f"CPU autocast to {dtype} not supported by torch {torch.__version__}")
    block = make(name, 64)
    for p in block.parameters():  # gamma != 0 so DANet/CCNet attention paths count
        if p.numel() == 1:
            nn.init.constant_(p, 0.5)
    x = rand(2, 64, 13, 9) * 4
    for train in (True, False):
        block.train(train)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            out = block(x)
        assert out.shape == x.shape
        assert torch.isfinite(out.float()).all(), (name, dtype, train)
        # the low-precision result stays close to float32
        block_out32 = block(x).detach()
        err = (out.float() - block_out32).abs().max() / block_out32.abs().max()
        assert err < 0.1, (name, dtype, float(err))


# ---------------------------------------------------------------- semantics

@pytest.mark.parametrize("name", ["se", "eca", "cbam", "ca", "sge", "gam"])
def test_gating_blocks_scale_x_by_a_gate_in_0_1(name):
    block = make(name, 64).train()
    if name == "sge":  # at init SGE's gate is the constant sigmoid(1); give it a trained-looking weight
        with torch.no_grad():
            block.weight.normal_(generator=torch.Generator().manual_seed(2))
    x = rand(2, 64, 9, 7)
    out = block(x).detach()
    assert (out.abs() <= x.abs()).all()
    nz = x.abs() > 1e-3
    ratio = out[nz] / x[nz]
    assert (ratio > 0).all() and (ratio < 1).all()
    # a real gate: not a constant factor everywhere
    assert ratio.std() > 1e-3


def test_se_gate_is_per_channel():
    block = make("se", 32)
    x = rand(1, 32, 5, 6) + 5  # positive, so the ratio is well defined everywhere
    ratio = block(x).detach() / x
    # one factor per channel: constant over the spatial map
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-6)
    manual = torch.sigmoid(block.fc[3](torch.relu(block.fc[1](x.mean((2, 3), keepdim=True)))))
    assert torch.allclose(ratio[:, :, :1, :1], manual, atol=1e-6)


def test_eca_gate_matches_1d_conv_over_channels():
    block = make("eca", 64)
    x = rand(2, 64, 4, 5)
    pooled = x.mean((2, 3))                                              # b,c
    k = block.conv.weight.view(-1)
    padded = nn.functional.pad(pooled, (1, 1))                            # k=3 for 64 channels
    manual = sum(k[i] * padded[:, i:i + 64] for i in range(3))
    expected = x * torch.sigmoid(manual)[:, :, None, None]
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_bam_output_is_x_times_one_plus_gate():
    block = make("bam", 64).train()
    x = rand(2, 64, 9, 7)
    out = block(x).detach()
    nz = x.abs() > 1e-3
    ratio = out[nz] / x[nz]
    assert (ratio > 1).all() and (ratio < 2).all()
    assert ratio.std() > 1e-3


def test_sa_and_sge_at_init_scale_by_sigmoid_one():
    # both initialise their gate weights to 0 and biases to 1: gate = sigmoid(1) everywhere
    x = rand(2, 64, 6, 5)
    s = torch.sigmoid(torch.tensor(1.0))
    sge = make("sge", 64)
    assert torch.allclose(sge(x), x * s, atol=1e-6)
    sa = make("sa", 64)
    assert torch.allclose(sa(x), channel_shuffle(x * s), atol=1e-6)
    # once trained away from init the gates depend on the input
    with torch.no_grad():
        sa.cweight.fill_(2.0)
        sa.sweight.fill_(-3.0)
        sge.weight.fill_(2.0)
    assert not torch.allclose(sa(x), channel_shuffle(x * s), atol=1e-3)
    assert not torch.allclose(sge(x), x * s, atol=1e-3)
    # SA still only gates (in (0,1)) and shuffles: undo the shuffle to compare with x
    inv = sa(x).detach().reshape(2, 32, 2, 6, 5).transpose(1, 2).reshape(2, 64, 6, 5)
    nz = x.abs() > 1e-3
    ratio = inv[nz] / x[nz]
    assert (ratio > 0).all() and (ratio < 1).all()


def test_psa_is_x_times_channel_plus_spatial_gate():
    block = make("psa", 64)
    x = rand(2, 64, 9, 7)
    out = block(x).detach()
    assert (out.abs() < 2 * x.abs() + 1e-12).all()
    nz = x.abs() > 1e-3
    ratio = out[nz] / x[nz]
    # channel gate sigmoid(.) in (0,1); spatial gate sigmoid(softmax) in (0.5, sigmoid(1))
    assert (ratio > 0.5).all() and (ratio < 1 + 1 / (1 + math.exp(-1))).all()
    # both parts recomputed by hand from the official PSA_p
    b, c, h, w = x.shape
    v = block.ch_value(x).flatten(2)
    q = torch.softmax(block.ch_query(x).flatten(2), -1)
    ch = torch.sigmoid(block.ch_up(torch.bmm(v, q.transpose(1, 2)).unsqueeze(-1)))
    sq = block.sp_query(x).mean((2, 3)).unsqueeze(1)
    sp = torch.sigmoid(torch.softmax(torch.bmm(sq, block.sp_value(x).flatten(2)), -1)).view(b, 1, h, w)
    assert torch.allclose(out, x * (ch + sp), atol=1e-5)


def test_danet_at_init_is_two_x_then_differs():
    block = make("danet", 32)
    x = rand(2, 32, 5, 6)
    assert torch.equal(block(x), 2 * x)
    for gamma_owner in (block.position, block.channel):
        with torch.no_grad():
            gamma_owner.gamma.fill_(1.0)
        assert not torch.allclose(block(x), 2 * x, atol=1e-3)
        with torch.no_grad():
            gamma_owner.gamma.zero_()


def test_danet_channel_module_matches_paper():
    cam = DANet(8).channel
    with torch.no_grad():
        cam.gamma.fill_(1.0)
    x = rand(1, 8, 3, 4)
    f = x.flatten(2)
    energy = f @ f.transpose(1, 2)
    attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, -1)
    assert torch.allclose(cam(x), (attn @ f).view_as(x) + x, atol=1e-5)


def test_ccnet_at_init_is_identity_then_differs():
    block = make("ccnet", 32)
    x = rand(2, 32, 5, 6)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.cca.gamma.fill_(1.0)
    assert not torch.allclose(block(x), x, atol=1e-3)


def _changed_pixels(module, x, r, c):
    with torch.no_grad():
        y0 = module(x)
        x2 = x.clone()
        x2[:, :, r, c] += 3.0
        y1 = module(x2)
    return (y1 - y0).abs().amax((0, 1))  # h,w


def test_criss_cross_reaches_only_row_and_column_in_one_pass():
    torch.manual_seed(0)
    cca = CrissCrossAttention(16)
    with torch.no_grad():
        cca.gamma.fill_(1.0)
    x = rand(1, 16, 7, 9)
    r, c = 2, 5
    diff = _changed_pixels(cca, x, r, c)
    on_cross = torch.zeros(7, 9, dtype=torch.bool)
    on_cross[r, :] = True
    on_cross[:, c] = True
    assert (diff[~on_cross] < 1e-6).all()
    assert (diff[on_cross] > 1e-4).all()


def test_ccnet_two_recurrences_reach_every_pixel():
    block = make("ccnet", 16)
    assert block.recurrence == 2
    with torch.no_grad():
        block.cca.gamma.fill_(1.0)
    diff = _changed_pixels(block, rand(1, 16, 7, 9), 2, 5)
    assert (diff > 1e-6).all()


def test_criss_cross_counts_own_pixel_once():
    # attention weights over the h + w - 1 distinct pixels of the cross sum to one:
    # with value = identity and constant energies, the output is the mean of the cross
    cca = CrissCrossAttention(8)
    with torch.no_grad():
        for conv in (cca.query, cca.key):
            conv.weight.zero_()
            conv.bias.zero_()
        cca.value.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        cca.value.bias.zero_()
        cca.gamma.fill_(1.0)
    h, w = 4, 5
    x = rand(1, 8, h, w)
    out = cca(x) - x
    i, j = 1, 3
    cross = (x[0, :, i, :].sum(1) + x[0, :, :, j].sum(1) - x[0, :, i, j]) / (h + w - 1)
    assert torch.allclose(out[0, :, i, j], cross, atol=1e-5)


def test_ca_uses_both_directions():
    block = make("ca", 64)
    x = rand(1, 64, 6, 8)
    ratio = block(x).detach() / x
    # the gate is a_h (per row) times a_w (per column): rank one per channel
    for ch in range(3):
        g = ratio[0, ch]
        assert torch.linalg.matrix_rank(g, atol=1e-4) == 1
    assert block.conv_h.out_channels == 64 and block.conv_w.out_channels == 64
    assert block.conv1.out_channels == 8  # mip = max(8, C/32)


# ---------------------------------------------------------------- registry

def test_blocks_take_keyword_arguments():
    assert nparams(build_attention("se", 256, reduction=8)) == 256 * 32 + 32 + 32 * 256 + 256
    assert build_attention("eca", 256, kernel_size=7).conv.kernel_size == (7,)
    assert build_attention("ccnet", 64, recurrence=1).recurrence == 1


def test_sge_on_a_one_pixel_map_is_finite():
    # a 32-px input (allowed by make_config) gives YOLOv4-tiny a 1x1 feat2
    block = make("sge", 64).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = block(rand(2, 64, 1, 1))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_blocks_run_with_low_precision_weights(name):
    """A model converted with .half()/.bfloat16() (fast inference) keeps every block working, output in that dtype."""
    torch.manual_seed(0)
    block = build_attention(name, 64).eval().to(torch.bfloat16)
    for p in block.parameters():
        if p.numel() == 1:          # gamma of DANet/CCNet: non-zero so the attention path counts
            p.data.fill_(0.5)
    x = torch.randn(2, 64, 13, 9).to(torch.bfloat16)
    with torch.no_grad():
        out = block(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()
