"""WebDataset image shards: reading them as bytes and decoding samples; shared by build, train and eval."""

from kdcache.constants import DEFAULT_MAX_PIXELS
from kdcache.shards.decode import IMAGE_EXTS, Sample, decode_image, parse_sample, to_rgb
from kdcache.shards.tar import (
    RawSample,
    Reject,
    RejectError,
    ShardReport,
    describe_error,
    expand_urls,
    file_sha256,
    iter_shard,
)

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTS", "RawSample", "Reject", "RejectError", "Sample", "ShardReport",
           "decode_image", "describe_error", "expand_urls", "file_sha256", "iter_shard", "parse_sample", "to_rgb"]
