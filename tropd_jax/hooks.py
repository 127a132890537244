"""Periodic actions of the training loop (evaluation, checkpoints, logging, export), as Levanter's
`Trainer.add_hook(fn, every=N)` and Flax's `periodic_actions`.

Steps are counted as steps done: the loop calls `run(step + 1, ...)` after its step `step`, so `every=N` fires after
steps N, 2N, ... The last step (`total_steps`) belongs to the hooks added `at_end`: they fire there once, and the
periodic schedule does not apply to it, so a hook with both never fires twice and a periodic hook without `at_end`
does not fire at the end (an evaluation every N steps with `eval.at_end=False` skips the last step even when N
divides it). A step after which the run stops early (`stopping`: a preemption) fires the hooks as scheduled, except
that `on_stop='always'` fires a hook there in any case (the checkpoint a resume needs) and `on_stop='never'` keeps
a slow hook from delaying the exit (evaluation, export).
"""

import dataclasses
from collections.abc import Callable, Mapping

ON_STOP = ('scheduled', 'always', 'never')


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable  # fn(step, *args) -> a dict of metrics to merge into the step's row, or None
    every: int = 0  # fire after every `every` steps (0: never periodically)
    at_end: bool = False  # fire after the last step
    on_stop: str = 'scheduled'  # at a step the run stops after early: as scheduled, 'always' or 'never'

    def due(self, step: int, total_steps: int, stopping: bool = False) -> bool:
        """Whether the hook fires after `step` steps of `total_steps`."""
        if stopping and self.on_stop != 'scheduled':
            return self.on_stop == 'always'
        if step == total_steps:
            return self.at_end
        return self.every > 0 and step % self.every == 0


class Hooks:
    """Hooks in the order they were added; `run` calls those due at a step."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.hooks: list[Hook] = []

    def add(self, fn: Callable, *, every: int = 0, at_end: bool = False, on_stop: str = 'scheduled') -> Hook:
        if every < 0:
            raise ValueError(f'every must be >= 0, got {every}')
        if on_stop not in ON_STOP:
            raise ValueError(f'on_stop must be one of {ON_STOP}, got {on_stop!r}')
        hook = Hook(fn, every, at_end, on_stop)
        self.hooks.append(hook)
        return hook

    def run(self, step: int, *args, stopping: bool = False) -> dict:
        """Calls `fn(step, *args)` of every hook due after `step` steps, in the order added (each at most once);
        returns the dicts they return, merged (later hooks win)."""
        merged = {}
        for hook in self.hooks:
            if hook.due(step, self.total_steps, stopping):
                result = hook.fn(step, *args)
                if isinstance(result, Mapping):
                    merged.update(result)
        return merged
