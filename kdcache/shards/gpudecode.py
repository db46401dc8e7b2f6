"""JPEG decode on the teacher's device (`kdcache build --decode gpu`): which members the device decodes, and the
batched decode itself, with a per-sample fallback to PIL.

The DataLoader workers only read bytes and headers (`probe_image`): a baseline or progressive 8-bit JPEG in RGB or
greyscale goes to the device; anything else (PNG, WebP, CMYK/YCCK JPEGs, MPO, a JPEG without its end marker) is
decoded by PIL in the worker, as `--decode cpu` would, and counted under its `FALLBACKS` reason. The main process
decodes a batch's JPEGs in one `torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg on CUDA, libjpeg on the
CPU, which is how the tests run this path); a batch nvjpeg refuses is retried one image at a time, and an image it
still refuses comes back as None for the caller to decode with PIL (reason "nvjpeg_error").

Greyscale JPEGs are decoded straight to RGB (ImageReadMode.RGB: the grey channel repeated, as PIL's L -> RGB).
EXIF orientation is ignored by both decoders, as by `parse_sample`.

nvjpeg's batched decode blocks its caller until the batch is decoded (torchvision synchronises its decoder's stream),
so the build and students decode and render each batch one batch ahead, on a background thread (`ahead`), while the
main thread launches the forward and waits for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from kdcache.shards.decode import RejectError, decode_image, open_image

DECODERS = ("cpu", "gpu")
# Why a member of a --decode gpu build was decoded by PIL instead (counted per shard in its status, "decode").
FALLBACKS = {
    "not_jpeg": "PNG, WebP or another format the device decoder does not read",
    "jpeg_mode": "a JPEG that is not 8-bit RGB or greyscale (CMYK, YCCK, ...)",
    "jpeg_mpo": "a multi-picture (MPO) camera file",
    "jpeg_no_eoi": "a JPEG without its end-of-image marker (truncated): PIL decides whether it decodes",
    "nvjpeg_error": "the device decoder refused it at decode time",
}
_DEVICE_MODES = ("RGB", "L")
_EOI = b"\xff\xd9"
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class Probe:
    """What a member's header says: its size, and why the device will not decode it (None: it will)."""

    width: int
    height: int
    fallback: str | None


def probe_image(data: bytes, *, max_pixels: int) -> Probe:
    """Read only the header of an image member. Raises RejectError (empty_image, too_large, undecodable) exactly as
    `decode_image` would for the header, so a sample is rejected for the same reason whichever decoder runs."""
    im = open_image(data, max_pixels=max_pixels, load=False)
    w, h = im.size
    if im.format == "MPO":
        why = "jpeg_mpo"
    elif im.format != "JPEG":
        why = "not_jpeg"
    elif im.mode not in _DEVICE_MODES or im.info.get("bits", 8) != 8:
        why = "jpeg_mode"
    elif not data.rstrip(b"\x00").endswith(_EOI):
        why = "jpeg_no_eoi"
    else:
        why = None
    return Probe(w, h, why)


def device_decode_problem(device: str | torch.device) -> str | None:
    """Why JPEGs cannot be decoded on `device` by nvjpeg, or None. Only CUDA devices decode with nvjpeg; the CPU
    path (libjpeg) exists for tests, not for `--decode gpu`."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"--decode gpu decodes on the teacher's CUDA device, but --device is {str(dev)!r}: give --device cuda"
    if not torch.cuda.is_available():
        return "--decode gpu needs CUDA (nvjpeg through torchvision), and CUDA is not available here: use --decode cpu"
    return None


def _decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def decode_jpegs(datas: list[bytes], *, device: str | torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG members to uint8 RGB [3, H, W] on `device`, in one batched call; if the batch fails, one image at a
    time, so that one bad member costs only itself. None where the decoder refused the member."""
    if not datas:
        return []
    dev = torch.device(device)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        out = _decode(tensors, dev)
    except RuntimeError:
        out = []
        for t in tensors:
            try:
                out.append(_decode([t], dev)[0])
            except RuntimeError:
                out.append(None)
    return [None if x is None else _checked(x) for x in out]


def _checked(x: torch.Tensor) -> torch.Tensor | None:
    # ImageReadMode.RGB always gives 3 channels; anything else is a decoder this code does not know, refused.
    return x if x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3 else None


def decode_pictures(datas: list[bytes], *, device: str | torch.device, max_pixels: int,
                    background: tuple[int, int, int]):
    """Each JPEG member decoded as a `--decode gpu` build decodes it: on `device` in one batched call (uint8 RGB
    [3, H, W] tensors), and, where the device refuses one, by PIL (a PIL image, "nvjpeg_error"), or PIL's RejectError
    where PIL refuses it too. The build (kdcache.cache.gpuviews) and students replaying its views share this."""
    out: list = list(decode_jpegs(datas, device=device))
    for i, pic in enumerate(out):
        if pic is None:
            try:
                out[i] = decode_image(datas[i], max_pixels=max_pixels, background=background)
            except RejectError as e:
                out[i] = e
    return out


def ahead(items: Iterable[T], work: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """Each of `items` with `work(item)`, in order, the work done on one background thread one item ahead: while the
    caller uses item k (launches a forward and waits for it), the thread decodes and renders item k+1. torch releases
    the GIL in its ops and in torchvision's nvjpeg decode, which blocks until the batch is decoded: this takes the
    decode off the thread that feeds the GPU. On CUDA the work runs on a stream of its own (`_SideStream`). An
    exception from `work` is raised at its item; closing the generator (a break, an error in the caller) cancels the
    work not yet started and does not wait for the one running."""
    # The thread works on the caller's CUDA device (a torch.cuda.set_device is per thread), if CUDA is in use.
    cuda = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="kdcache-decode",
                              initializer=None if cuda is None else torch.cuda.set_device, initargs=(cuda,))
    side = None if cuda is None else _SideStream(work)
    run, take = (work, lambda r: r) if side is None else (side, side.take)

    def finished(pending):  # (item, its future) -> (item, its work's result), on the caller's thread
        return pending[0], take(pending[1].result())
    it = iter(items)
    pending = None
    try:
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            except Exception:  # the items before the failure are still delivered (a finished shard is written)
                if pending is not None:
                    yield finished(pending)
                raise
            started = pool.submit(run, item)
            if pending is not None:
                yield finished(pending)
            pending = (item, started)
        if pending is not None:
            yield finished(pending)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _SideStream:
    """`ahead`'s work on CUDA, on a stream of the decode thread's own, handed over to the caller's stream safely.

    torchvision allocates nvjpeg's output on the current stream and nvjpeg writes it on a stream of its own, without
    waiting for anything queued on the current stream. On the caller's stream, the caching allocator hands out blocks
    the forward just freed while its kernels are still queued, and nvjpeg would write into them under those kernels.
    So the work runs on this thread's stream, drained before each item (only the previous item's rendering is on it),
    and its outputs reach the caller's stream through an event, recorded there (`record_stream`) so that their blocks
    are not handed out again before the caller's kernels are done with them."""

    def __init__(self, work: Callable):
        self.work, self.stream = work, None

    def __call__(self, item):  # on the decode thread
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()
            out = self.work(item)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    @staticmethod
    def take(result):  # on the caller's thread
        out, done = result
        stream = torch.cuda.current_stream()
        stream.wait_event(done)
        for t in _cuda_tensors(out):
            t.record_stream(stream)
        return out


def _cuda_tensors(x) -> Iterator[torch.Tensor]:
    """The CUDA tensors in a tensor, or in the values of a dict or the items of a list or tuple, at any depth."""
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _cuda_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _cuda_tensors(v)
