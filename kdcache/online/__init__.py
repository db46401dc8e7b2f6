"""Online distillation (the teacher live in the training loop): the baseline kdcache's cache replaces.

The only training code that may build a teacher; `kdcache.train` never imports it."""

from kdcache.online.loop import OnlineTargets, run_online

__all__ = ["OnlineTargets", "run_online"]
