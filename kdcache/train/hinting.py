"""The student's side of the `hint` loss: `--hint-map STUDENT_MODULE=TEACHER_HINT` pairs, the student's pooled
features of those modules (hooks kept on the student for the whole run) and a training-only adapter per pair.

    hints = StudentHints(student, {"visual.trunk.layer3": "visual.trunk.layer3"}, teacher_dims={...}, pool="cls",
                         adapter="linear", seed=0)
    s = student(x)                       # the hooks record the mapped modules' outputs
    pairs = hints.pairs(batch, device)   # ((adapter(student feature), teacher hint), ...) for LossInputs.hints
"""

from __future__ import annotations

import torch

from kdcache.hints import HintError, HintHooks
from kdcache.train.config import TrainError
from kdcache.train.students import Student, StudentError


def parse_hint_map(values) -> tuple[tuple[str, str], ...]:
    """`--hint-map` values STUDENT_MODULE=TEACHER_HINT -> pairs, in the order given."""
    pairs = []
    for v in values:
        s, sep, t = str(v).partition("=")
        if not sep or not s.strip() or not t.strip():
            raise TrainError(f"--hint-map {v!r}: expected STUDENT_MODULE=TEACHER_HINT (module paths as `kdcache "
                             "layers` lists them)")
        pairs.append((s.strip(), t.strip()))
    return tuple(pairs)


class StudentHints:
    """Hooks on the student's mapped modules and one adapter per pair (added to `student.hint_adapters`, so they
    train, checkpoint and resume with it; export leaves them out)."""

    def __init__(self, student: Student, hint_map: tuple[tuple[str, str], ...], *, teacher_dims: dict[str, int],
                 pool: str, adapter: str, seed: int):
        self.student, self.map = student, hint_map
        missing = [t for _, t in hint_map if t not in teacher_dims]
        if missing:
            raise TrainError(f"--hint-map names teacher hints {missing} that the teacher does not provide (it has "
                             f"{sorted(teacher_dims) or 'none'}; build the cache with --hints MODULE)")
        try:
            self.hooks = HintHooks(student.model, [s for s, _ in hint_map], mode=pool)
        except HintError as e:
            raise TrainError(f"--hint-map: {e}") from None
        self.hooks.__enter__()
        widths = self._student_widths()
        with torch.random.fork_rng(devices=[]):  # adapters start the same for the same seed, the caller's RNG intact
            torch.manual_seed(seed + 1)
            try:
                student.add_hint_adapters([(widths[s], teacher_dims[t]) for s, t in hint_map], adapter=adapter)
            except StudentError as e:
                raise TrainError(str(e)) from None

    def _student_widths(self) -> dict[str, int]:
        """Each mapped module's pooled width, from one forward of a blank image in eval mode (so no normalisation
        statistics move)."""
        s = self.student
        size = s.preprocess["size"]
        h, w = (size, size) if isinstance(size, int) else size
        device = next(s.model.parameters()).device
        was_training = s.training
        s.eval()
        with torch.no_grad():
            s(s.normalize_pixels(torch.zeros(1, 3, h, w, dtype=torch.uint8, device=device)))
        s.train(was_training)
        return {n: int(f.shape[-1]) for n, f in self.hooks.take().items()}

    def pairs(self, batch: dict, device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(adapter(student feature), teacher hint) per pair, from the student's last forward and the batch."""
        feats = self.hooks.take()
        adapters = self.student.hint_adapters
        return tuple((adapters[str(i)](feats[s]), batch[f"hint:{t}"].to(device, non_blocking=True).float())
                     for i, (s, t) in enumerate(self.map))

    def close(self) -> None:
        self.hooks.__exit__(None, None, None)
