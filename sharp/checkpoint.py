"""Saving and restoring a run: the resume checkpoint (with the previous one kept), the epoch
checkpoints and the final weights, all written atomically by the main process only."""

from __future__ import annotations

from typing import Any

import torch

from sharp.runs import RunDir, atomic_torch_save, keep_previous, load_checkpoint


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state_dict as detached CPU copies (what the checkpoints and final.pt hold): a
    copy, never a view, since torch.save writes a view's whole storage (an ensemble member's
    weights view the stacked weights of every member, see sharp.ensemble)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Checkpointer:
    """Owns `checkpoints/last.pt` (and `last.prev.pt`, the one before it), the epoch checkpoints
    and `final.pt` of one run. On any process but the main one every save does nothing."""

    def __init__(self, run: RunDir, is_main: bool = True) -> None:
        self.run = run
        self.is_main = is_main

    def save_last(self, state: dict[str, Any]) -> None:
        """Replace last.pt atomically, keeping the version it replaces as last.prev.pt."""
        if self.is_main:
            keep_previous(self.run.last_checkpoint, self.run.previous_checkpoint)
            atomic_torch_save(self.run.last_checkpoint, state)

    def load_last(self) -> dict[str, Any]:
        """last.pt, read as data only (`weights_only=True`); a corrupt one names its fallback."""
        return load_checkpoint(self.run.last_checkpoint, fallback=self.run.previous_checkpoint)

    def save_epoch(self, epoch: int, model: torch.nn.Module, step: int, examples: int) -> None:
        if self.is_main:
            state = {"model": plain_state(model), "epoch": epoch, "step": step, "examples": examples}
            atomic_torch_save(self.run.epoch_checkpoint(epoch), state)

    def save_final(self, model: torch.nn.Module) -> None:
        if self.is_main:
            atomic_torch_save(self.run.final, plain_state(model))
