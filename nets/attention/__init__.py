"""Attention blocks and their registry: `build_attention(phi_or_name, channels, **options)`."""
from nets.attention.registry import (ALIASES, ATTENTION_BLOCKS, attention_name, attention_phi, attention_placement,
                                     build_attention, build_point, load_plugin, register_attention,
                                     start_near_identity)
from nets.attention.blocks import (CBAM, ECA, SE, BatchNormSingle1d, CoordAttention, HSwish,  # noqa: E402
                                   eca_kernel_size)
from nets.attention.more_blocks import BAM, GAM, SGE, PolarizedSelfAttention, ShuffleAttention  # noqa: E402
from nets.attention.self_attention import (CCNet, ChannelAttention, CrissCrossAttention, DANet,  # noqa: E402
                                           PositionAttention)
from utils.config import PHI_NAMES as ATTENTION_NAMES  # noqa: E402

# the built-ins registered themselves in phi order on import
assert tuple(ATTENTION_BLOCKS)[:len(ATTENTION_NAMES) - 1] == ATTENTION_NAMES[1:], "built-in blocks out of phi order"

__all__ = ["ALIASES", "ATTENTION_BLOCKS", "ATTENTION_NAMES", "BAM", "CBAM", "CCNet", "DANet", "ECA", "GAM", "SE",
           "SGE", "BatchNormSingle1d", "ChannelAttention", "CoordAttention", "CrissCrossAttention", "HSwish",
           "PolarizedSelfAttention", "PositionAttention", "ShuffleAttention", "attention_name", "attention_phi", "attention_placement", "build_point",
           "build_attention", "eca_kernel_size", "load_plugin", "register_attention",
           "start_near_identity"]
