"""Hidden-layer hints: pooled features of chosen image-tower modules, for the teacher (cached by `kdcache build
--hints`, or computed live by online KD) and for the student (matched by the `hint` loss through `--hint-map`).

A hint is a module's output pooled to one vector per image: a conv block's [B, C, H, W] by global average; a
transformer block's tokens [B, N, D] by the CLS token (`cls`, the default) or the mean of the patch tokens (`mean`);
a [B, D] output as it is. Modules are named by their path in the open_clip model (`kdcache layers` lists them with
their shapes), e.g. `visual.trunk.layer3` (timm towers), `visual.layer3` (open_clip's ResNet),
`visual.transformer.resblocks.5` (ViT).

Shared by the build, online KD and the trainer: this module must not import the teacher loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

POOLS = ("cls", "mean")


class HintError(ValueError):
    """A hint that cannot be taken as asked; the message names the module and the valid choices."""


def pool(out, *, mode: str, batch: int) -> torch.Tensor:
    """A module output pooled to float [B, C] (see the module docstring). `batch` tells token layouts apart: open_clip
    transformers run batch-first, older ones [N, B, D]."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise HintError(f"a hint module must output a tensor, got {type(out).__name__}")
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3))
    if out.ndim == 3:
        if out.shape[0] != batch and out.shape[1] == batch:
            out = out.transpose(0, 1)
        if mode == "cls":
            return out[:, 0].float()
        if mode == "mean":
            return out[:, 1:].float().mean(dim=1) if out.shape[1] > 1 else out[:, 0].float()
        raise HintError(f"hint pool {mode!r}: expected one of {', '.join(POOLS)}")
    if out.ndim == 2:
        return out.float()
    raise HintError(f"cannot pool a hint output of shape {tuple(out.shape)}")


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        near = [n for n, _ in model.named_modules() if n.startswith("visual.")][:12]
        raise HintError(f"no module {name!r} in the model; image-tower modules include {', '.join(near)}, ... "
                        "(`kdcache layers` lists them all with their shapes)") from None


class HintHooks:
    """Forward hooks that keep the pooled outputs of `names` from the last forward of `model`.

        with HintHooks(model, ["visual.trunk.layer3"], mode="cls") as hooks:
            model.encode_image(x)
            feats = hooks.take()     # {"visual.trunk.layer3": float [B, C]}, still in the autograd graph
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, mode: str = "cls"):
        if mode not in POOLS:
            raise HintError(f"hint pool {mode!r}: expected one of {', '.join(POOLS)}")
        self.names, self.mode = list(names), mode
        self.modules = {n: _module(model, n) for n in self.names}
        self.outputs: dict[str, torch.Tensor] = {}
        self.batch = 0
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0] if inputs else output
            self.outputs[name] = pool(output, mode=self.mode, batch=int(x.shape[0]) if torch.is_tensor(x) else 0)
        return hook

    def __enter__(self) -> HintHooks:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> dict[str, torch.Tensor]:
        """The last forward's pooled outputs, by name; every hooked module must have run."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise HintError(f"hint modules {missing} did not run in the forward pass (not part of the image tower?)")
        out, self.outputs = self.outputs, {}
        return out


@contextlib.contextmanager
def hooked(model: nn.Module, names: Sequence[str], *, mode: str = "cls") -> Iterator[HintHooks | None]:
    """`HintHooks` when there are names to hook, else None (so callers need no special case)."""
    if not names:
        yield None
        return
    with HintHooks(model, names, mode=mode) as hooks:
        yield hooks


def list_layers(model: nn.Module, example: torch.Tensor, *, mode: str = "cls") -> list[dict]:
    """Every image-tower module's name, type, output shape and pooled width for one forward of `example`
    (`model.encode_image`), in the order they ran: what `kdcache layers` prints and `--hints`/`--hint-map` take."""
    rows: list[dict] = []
    handles = []

    def hook(name: str, module: nn.Module):
        def fn(_m, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not torch.is_tensor(out):
                return
            try:
                dim = int(pool(out, mode=mode, batch=example.shape[0]).shape[-1])
            except HintError:
                dim = None
            rows.append({"name": name, "type": type(module).__name__, "shape": list(out.shape), "pooled": dim})
        return fn

    for name, module in model.named_modules():
        if name.startswith("visual.") or name == "visual":
            handles.append(module.register_forward_hook(hook(name, module)))
    try:
        with torch.no_grad():
            model.encode_image(example)
    finally:
        for h in handles:
            h.remove()
    return rows
