"""Sharpness-aware minimization: SAM (Foret et al. 2021, "Sharpness-Aware Minimization for
Efficiently Improving Generalization") and its adaptive form ASAM (Kwon et al. 2021, "ASAM:
Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks").

The ascent step is ε = ρ g/‖g‖ (SAM) or ε = ρ T²g/‖T g‖ with T = |w| elementwise (ASAM, as
the adaptive sharpness of `sharp.probes.sharpness` scales it; Kwon et al.'s code adds 0.01 to
|w|, which is not done here); the descent step takes the gradient at w + ε and applies it at w.
`sam_perturbation` is that ascent, shared by `SAM` (for users' own loops) and the training
step (`sharp.train.train_step`, which adds exact accumulation, m-sharpness, BN and DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from sharp.errors import SharpError

GRAD_NORM_FLOOR = 1e-12  # ‖g‖ below this gives ε = 0 (Foret et al.'s code adds it to the norm)


def sam_perturbation(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], rho: float, adaptive: bool
) -> list[torch.Tensor]:
    """ε for each parameter: ρ g/‖g‖, or ρ |w|² g/‖|w| g‖ (ASAM); the norm is over all of them
    together, computed in float64 on the device (no host sync)."""
    scaled = [
        torch.zeros_like(p) if g is None else (p.detach().abs() * g if adaptive else g)
        for p, g in zip(params, grads, strict=True)
    ]
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(s, dtype=torch.float64) for s in scaled])
    )
    factor = torch.where(norm > GRAD_NORM_FLOOR, rho / norm, torch.zeros_like(norm))
    return [
        (s * p.detach().abs() if adaptive else s) * factor.to(s.dtype)
        for p, s in zip(params, scaled, strict=True)
    ]


@torch.no_grad()
def shift(params: Iterable[torch.Tensor], deltas: Iterable[torch.Tensor], sign: float = 1.0) -> None:
    """w ← w + sign · δ for each parameter."""
    for p, delta in zip(params, deltas, strict=True):
        p.add_(delta, alpha=sign)


class SAM(torch.optim.Optimizer):
    """SAM or ASAM around any torch optimizer, in the two-call form of the common PyTorch
    implementations::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)   # w ← w + ε(∇L(w))
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)  # w ← ε removed, then the base step with ∇L(w + ε)

    `base_optimizer` is the class (e.g. torch.optim.SGD), built over the same parameter groups
    with `**kwargs`. `step(closure)`, after a first backward, does the rest with a closure that
    re-evaluates the loss and calls backward. BN running statistics are the caller's business
    here: the training loop of `sharp train` updates them in the first pass only.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if not rho >= 0:
            raise SharpError(f"SAM rho={rho} must be zero or positive")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to w + ε from the gradients in `.grad`: one ε over all parameters (‖g‖ over
        all of them) when the groups share ρ and `adaptive`, as Foret et al. do; otherwise one
        per group."""
        settings = {(g["rho"], g["adaptive"]) for g in self.param_groups}
        if len(settings) == 1:
            ((rho, adaptive),) = settings
            blocks = [(self._params(), rho, adaptive)]
        else:
            blocks = [(list(g["params"]), g["rho"], g["adaptive"]) for g in self.param_groups]
        for params, rho, adaptive in blocks:
            deltas = sam_perturbation(params, [p.grad for p in params], rho, adaptive)
            shift(params, deltas)
            for p, delta in zip(params, deltas, strict=True):
                self.state[p]["sam_e"] = delta
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to w, then the base optimizer's step with the gradient taken at w + ε."""
        for p in self._params():
            if "sam_e" in self.state[p]:
                p.sub_(self.state[p].pop("sam_e"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is None:
            raise SharpError("SAM.step needs a closure that computes the loss and calls backward")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups
