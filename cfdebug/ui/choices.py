"""Choices the dashboard's forms offer (the CLI takes any value the configs accept).

Torch-free, like the views that import it.
"""

from __future__ import annotations

#: Treatment λ1 (reward of the true class's MC filters), log-spaced around the paper's 1e-4 … 2e-3.
TREATMENT_LAMBDA1_GRID: tuple[float, ...] = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1)
#: Treatment λ2 (penalty on the other filters), log-spaced around the paper's 1e-5 … 1e-4.
TREATMENT_LAMBDA2_GRID: tuple[float, ...] = (0.0, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 1e-3)
#: Fine-tuning learning rates (SGD) offered for a treatment run.
TREATMENT_LR_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
#: The XCR selector's β (weight of KL(p || uniform)) values of paper B's Table 1.
XCR_BETA_CHOICES: tuple[float, ...] = (0.1, 0.01, 0.001)
