import dataclasses
import math

import pytest
import torch

from obliviate.errors import ObliviateError
from obliviate.methods import factorization
from obliviate.methods.factorization import (
    FactorizationConfig, balance, factorize, keep_per_column, polish_on_support,
    reference_factorize, ridge_right_solve, winner_take_all,
)


def low_rank_sparse_matrix(d=24, n=300, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(d, k, generator=g, dtype=torch.float64)
    G = torch.randn(n, k, generator=g, dtype=torch.float64) * (torch.rand(n, k, generator=g) < 0.1)
    return F @ G.T + 0.01 * torch.randn(d, n, generator=g, dtype=torch.float64)


def test_ridge_solve_is_the_closed_form_ridge_solution():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(7, 4, generator=g, dtype=torch.float64)
    M = torch.randn(30, 4, generator=g, dtype=torch.float64)
    gram, reg = M.T @ M, 1e-3
    X = ridge_right_solve(B, gram, reg)
    expected = B @ torch.linalg.inv(gram + reg * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(X, expected, rtol=1e-10, atol=1e-12)


def test_ridge_solve_reports_failure_instead_of_returning_garbage():
    gram = -torch.eye(3, dtype=torch.float64)  # not positive definite
    assert ridge_right_solve(torch.ones(2, 3, dtype=torch.float64), gram, 1e-4) is None


def test_winner_take_all_keeps_the_largest_magnitudes_per_column():
    G = torch.tensor([[1.0, -5.0], [-3.0, 2.0], [2.0, 0.5], [0.1, -4.0]], dtype=torch.float64)
    sparse, rows = winner_take_all(G, 2)
    expected = torch.tensor([[0.0, -5.0], [-3.0, 0.0], [2.0, 0.0], [0.0, -4.0]], dtype=torch.float64)
    assert torch.equal(sparse, expected)
    assert sorted(rows[:, 0].tolist()) == [1, 2]


def test_balance_keeps_the_product_and_normalises_g():
    g = torch.Generator().manual_seed(2)
    F, G = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
    F2, G2 = balance(F, G)
    torch.testing.assert_close(F2 @ G2.T, F @ G.T)
    torch.testing.assert_close(G2.norm(dim=0), torch.ones(3, dtype=torch.float64))


def test_keep_per_column_is_ceil_of_one_percent():
    assert keep_per_column(4787, 0.01) == math.ceil(47.87)
    assert keep_per_column(30, 0.01) == 1


def test_fast_solver_matches_reference_sparsity_and_is_no_worse():
    A = low_rank_sparse_matrix()
    config = FactorizationConfig(k=6, sparsity=0.1, patience=50, max_iterations=2000)
    fast, ref = factorize(A, config), reference_factorize(A, config)
    keep = keep_per_column(A.shape[1], 0.1)
    assert ((fast.G != 0).sum(dim=0) <= keep).all()
    assert fast.loss <= ref.loss * (1 + 1e-9)
    recomputed = float(((A - fast.F @ fast.G.T) ** 2).sum())
    assert fast.loss == pytest.approx(recomputed, rel=1e-9)
    assert fast.loss < 0.5 * float((A ** 2).sum())


def test_trace_loss_equals_the_reconstruction_loss_each_iteration():
    A = low_rank_sparse_matrix(seed=3)
    config = FactorizationConfig(k=6, sparsity=0.1, max_iterations=5, polish_rounds=0, tolerance=0.0, patience=100)
    fast, ref = factorize(A, config), reference_factorize(A, config)
    # Same updates from the same seed: the loss history is the reference's, iterate by iterate.
    assert fast.history == pytest.approx(ref.history, rel=1e-9)


def test_polish_never_raises_the_loss():
    A = low_rank_sparse_matrix(seed=4)
    result = factorize(A, FactorizationConfig(k=6, sparsity=0.1, polish_rounds=0))
    F, G, reg = polish_on_support(A, result.F, result.G, 5, 1e-4)
    assert reg == 1e-4  # no solve failed, so the ridge stays
    assert torch.equal(G != 0, (G != 0) & (result.G != 0))  # support is kept
    assert float(((A - F @ G.T) ** 2).sum()) <= result.loss + 1e-9


def _solver_failing_after(monkeypatch, successes: int) -> list[float]:
    """Make ``ridge_right_solve`` fail (None, as for a singular gram) after ``successes``
    calls; returns the reg of every call."""
    real, regs = factorization.ridge_right_solve, []

    def solve(B, gram, reg):
        regs.append(reg)
        return real(B, gram, reg) if len(regs) <= successes else None

    monkeypatch.setattr(factorization, "ridge_right_solve", solve)
    return regs


# Three iterations, two solves each: the polish's first solve is call 7.
SHORT = FactorizationConfig(k=6, sparsity=0.1, max_iterations=3, tolerance=0.0, patience=100, polish_rounds=5)


def test_a_polish_that_fails_at_every_ridge_keeps_the_pre_polish_solution(monkeypatch):
    A = low_rank_sparse_matrix(seed=6)
    unpolished = factorize(A, dataclasses.replace(SHORT, polish_rounds=0))
    regs = _solver_failing_after(monkeypatch, 6)
    result = factorize(A, SHORT)
    # The polish retried like the main loop (reg x10, reg_tries times), then gave up.
    assert regs[6:] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1], rel=1e-12)
    assert torch.equal(result.F, unpolished.F) and torch.equal(result.G, unpolished.G)
    assert result.loss == pytest.approx(unpolished.loss, rel=1e-9)
    assert result.loss == pytest.approx(float(((A - result.F @ result.G.T) ** 2).sum()), rel=1e-9)
    assert result.polish.startswith("failed: The ridge solve failed 4 times")
    assert "pre-polish solution is kept" in result.polish
    assert unpolished.polish == "not run"


def test_a_polish_solve_that_fails_once_is_retried_at_ten_times_the_ridge(monkeypatch):
    A = low_rank_sparse_matrix(seed=6)
    unpolished = factorize(A, dataclasses.replace(SHORT, polish_rounds=0))
    real, regs = factorization.ridge_right_solve, []

    def solve(B, gram, reg):
        regs.append(reg)
        return None if len(regs) == 7 else real(B, gram, reg)

    monkeypatch.setattr(factorization, "ridge_right_solve", solve)
    result = factorize(A, SHORT)
    assert regs[6:8] == pytest.approx([1e-4, 1e-3], rel=1e-12)
    assert len(regs) == 6 + 1 + SHORT.polish_rounds  # then every round solved at the raised ridge
    assert regs[8:] == pytest.approx([1e-3] * (SHORT.polish_rounds - 1), rel=1e-12)
    assert result.polish == "lowered the loss (solved at reg 0.001)"
    assert result.loss < unpolished.loss
    assert result.loss == pytest.approx(float(((A - result.F @ result.G.T) ** 2).sum()), rel=1e-9)
    assert torch.equal(result.G != 0, (result.G != 0) & (unpolished.G != 0))  # support is kept


def test_a_polish_that_succeeds_says_so():
    A = low_rank_sparse_matrix(seed=6)
    unpolished = factorize(A, dataclasses.replace(SHORT, polish_rounds=0))
    result = factorize(A, SHORT)
    assert result.polish == "lowered the loss"
    assert result.loss < unpolished.loss


def test_row_solves_on_the_support_report_failure_instead_of_returning_nan():
    A = low_rank_sparse_matrix(d=8, n=40, k=3)
    F = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=A.dtype)
    support = torch.zeros(40, 3, dtype=torch.bool)
    support[:, 0] = True
    G = factorization._solve_rows_on_support(A, F, support, 40, 1e-4)
    assert G is not None and bool(torch.isfinite(G).all()) and bool((G[:, 1:] == 0).all())
    A[0, 0] = float("inf")
    assert factorization._solve_rows_on_support(A, F, support, 40, 1e-4) is None


def test_factorization_is_deterministic_under_a_seed_and_changes_with_it():
    A = low_rank_sparse_matrix(seed=5).float()
    a = factorize(A, FactorizationConfig(k=6, sparsity=0.1, seed=7))
    b = factorize(A, FactorizationConfig(k=6, sparsity=0.1, seed=7))
    c = factorize(A, FactorizationConfig(k=6, sparsity=0.1, seed=8))
    assert torch.equal(a.G, b.G) and torch.equal(a.F, b.F)
    assert not torch.equal(a.G, c.G)


def test_bad_settings_and_inputs_are_clear_errors():
    with pytest.raises(ObliviateError, match="sparsity"):
        FactorizationConfig(sparsity=0)
    with pytest.raises(ObliviateError, match="at least K tokens"):
        factorize(torch.randn(8, 5), FactorizationConfig(k=10))
    A = torch.randn(8, 50)
    A[0, 0] = float("nan")
    with pytest.raises(ObliviateError, match="NaN"):
        factorize(A, FactorizationConfig(k=3))


def test_sparse_products_equal_the_dense_ones():
    from obliviate.methods.factorization import _sparse_products

    A = low_rank_sparse_matrix(d=16, n=200, k=5)
    G, rows = winner_take_all(torch.randn(200, 5, generator=torch.Generator().manual_seed(1), dtype=A.dtype), 3)
    AG, GtG = _sparse_products(A.T.contiguous(), G, rows)
    torch.testing.assert_close(AG, A @ G, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(GtG, G.T @ G, rtol=1e-5, atol=1e-6)
