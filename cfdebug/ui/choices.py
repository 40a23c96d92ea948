"""Choices the dashboard's forms offer (the CLI takes any value the configs accept).

Torch-free, like the views that import it.
"""

from __future__ import annotations


def _log_grid(low: float, high: float) -> tuple[float, ...]:
    """0, then 1-2-5 steps per decade from ``low`` to ``high`` (both powers of ten)."""
    values, decade = [0.0], low
    while decade <= high * (1 + 1e-9):
        values += [round(decade * m, 12) for m in (1, 2, 5) if decade * m <= high * (1 + 1e-9)]
        decade *= 10
    return tuple(values)


# The treatment λ grids span the range where each weighted term goes from a fraction of a percent
# of the loss to most of it, measured on a batch of 64 training images of each demo model
# (cfdebug.ui.treatment.base_batch_terms: the mean CE and the batch sums of the raw terms through
# cfdebug.treatment.treatment_loss with the workspace's treatment.training_sets):
#   Biased Digits: CE 0.197, Σ|f⊙G_y| 1740, Σ|(1−G_y)⊙f| 511;
#   Hard Digits:   CE 0.077, Σ|f⊙G_y| 2228, Σ|(1−G_y)⊙f| 286.
# Alone, λ1·L_MC is 1% of the loss at λ1 ≈ 1e-6 (demo) / 3e-7 (Hard Digits) and 90% at 1e-3 / 3e-4;
# λ2·L_nonMC is 1% at λ2 ≈ 4e-6 / 3e-6 and 90% at 4e-3 / 2e-3. The paper's grids (λ1 1e-4 … 2e-3,
# λ2 1e-5 … 1e-4) sit inside them; the defaults (1e-3, 2e-5) are on them.
#: Treatment λ1 (reward of the true class's MC filters): 0 and 1e-7 … 1e-2, log-spaced (1-2-5).
TREATMENT_LAMBDA1_GRID: tuple[float, ...] = _log_grid(1e-7, 1e-2)
#: Treatment λ2 (penalty on the other filters): 0 and 1e-6 … 1e-2, log-spaced (1-2-5).
TREATMENT_LAMBDA2_GRID: tuple[float, ...] = _log_grid(1e-6, 1e-2)
#: Fine-tuning learning rates (SGD) offered for a treatment run.
TREATMENT_LR_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
#: The XCR selector's β (weight of KL(p || uniform)) values of paper B's Table 1.
XCR_BETA_CHOICES: tuple[float, ...] = (0.1, 0.01, 0.001)
