"""SNMF: the factorization's update rules in closed form, feature selection, the low-rank
MLP edit (only the named weights move, revert gives the original bits), and a whole
`erase --method snmf` on a tiny model through the CLI."""
import json

import pytest
import torch

from obliviate.cli import main
from obliviate.edits.protocol import apply_verified, revert_verified
from obliviate.edits.weights import LowRankDelta
from obliviate.errors import ObliviateError
from obliviate.methods import get, snmf
from obliviate.methods.mlp_features import parse_layer_range

TINY = dict(rank=8, sparsity=0.25, ratio_threshold=1.0, max_iterations=60, in_layers=("0-1",), out_layers=("1-3",),
            max_tokens=300, max_sentences=40)


def random_problem(seed=0, d=12, n=40, k=4):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, n, generator=g, dtype=torch.float64)
    F = torch.randn(d, k, generator=g, dtype=torch.float64)
    G = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    return A, F, G


@pytest.mark.parametrize("seed", range(5))
def test_code_update_never_raises_the_loss_and_keeps_codes_nonnegative(seed):
    A, F, G = random_problem(seed)
    losses = [snmf.sq_loss(A, F, G)]
    for _ in range(30):
        G = snmf.update_codes(G, A.T @ F, F.T @ F)
        assert (G >= 0).all()
        losses.append(snmf.sq_loss(A, F, G))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


def test_feature_update_is_the_least_squares_solution():
    A, _, G = random_problem(1)
    F = snmf.update_features(A @ G, G, reg=0.0)
    expected = torch.linalg.lstsq(G, A.T).solution.T  # min_F ||A - F G^T|| column by column
    assert torch.allclose(F, expected, atol=1e-8)
    other = F + 1e-3 * torch.randn_like(F)
    assert snmf.sq_loss(A, F, G) <= snmf.sq_loss(A, other, G)


def test_alternating_updates_without_sparsity_never_raise_the_loss():
    A, F, G = random_problem(2)
    previous = snmf.sq_loss(A, F, G)
    for _ in range(20):
        F = snmf.update_features(A @ G, G, reg=0.0)
        G = snmf.update_codes(G, A.T @ F, F.T @ F)
        loss = snmf.sq_loss(A, F, G)
        assert loss <= previous * (1 + 1e-10)
        previous = loss


def test_semi_nmf_is_sparse_nonnegative_deterministic_and_reports_its_loss():
    A, _, _ = random_problem(3, d=30, n=60, k=5)
    first = snmf.semi_nmf(A, k=5, sparsity=0.2, max_iterations=80, seed=7)
    second = snmf.semi_nmf(A, k=5, sparsity=0.2, max_iterations=80, seed=7)
    assert torch.equal(first.F, second.F) and torch.equal(first.G, second.G)
    assert (first.G >= 0).all()
    assert ((first.F != 0).sum(0) <= 6).all()  # ceil(0.2 * 30) neurons per feature
    assert torch.allclose(first.F.norm(dim=0), torch.ones(5, dtype=torch.float64))
    assert first.loss == pytest.approx(snmf.sq_loss(A, first.F, first.G), rel=1e-6)
    assert first.relative_loss < 1.0
    third = snmf.semi_nmf(A, k=5, sparsity=0.2, max_iterations=80, seed=8)
    assert not torch.equal(first.G, third.G)


def test_feature_selection_by_ratio_and_coverage():
    source = torch.tensor([0] * 4 + [1] * 4)
    G = torch.zeros(8, 4)
    G[:4, 0], G[4:, 0] = 10.0, 1.0  # ratio 10, concept mass 10
    G[:4, 1], G[4:, 1] = 0.3, 0.05  # ratio 6, concept mass 0.3 (the tail coverage drops)
    G[:4, 2], G[4:, 2] = 1.0, 1.0  # ratio 1: not the concept
    G[:, 3] = 0.0
    config = snmf.Config(selection="reference", coverage=0.95)
    selected, ratios, _, passing = snmf.select_layer_features(G, source, config)
    assert passing == 2 and selected == [0]
    assert ratios[0] == pytest.approx(10.0, rel=1e-6)
    selected, *_ = snmf.select_layer_features(G, source, snmf.Config(selection="reference", coverage=1.0))
    assert selected == [0, 1]


def test_layer_ranges_scale_with_depth():
    assert parse_layer_range("9/26-17/26", 18) == list(range(6, 13))
    assert parse_layer_range("0/26-12/26", 18) == list(range(0, 9))
    assert parse_layer_range("0-3", 4) == [0, 1, 2, 3]
    assert parse_layer_range("0.0-1.0", 4) == [0, 1, 2, 3]
    with pytest.raises(ObliviateError, match="model has 4"):
        parse_layer_range("2-9", 4)
    with pytest.raises(ObliviateError, match="A-B"):
        parse_layer_range("middle", 4)


@pytest.mark.parametrize("settings, message", [
    ({"rank": 0}, "rank"), ({"w_modes": ("sideways",)}, "w_modes"), ({"deltas": (0.0,)}, "deltas"),
    ({"in_layers": ("0-1", "1-2")}, "paired"), ({"coverage": 1.5}, "coverage"), ({"selection": "vibes"}, "selection"),
])
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ObliviateError, match=message):
        snmf.Config(**settings)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fit_leaves_the_model_alone_and_edits_change_only_the_named_weights(tiny_lm, small_concept):
    before = _snapshot(tiny_lm.model)
    fitted = get("snmf").fit(tiny_lm, small_concept, snmf.Config(**TINY), 42, None)
    assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    points = [p for p, _ in fitted.candidates()]
    assert len(points) == 6 and points[0] == {"w_mode": "out", "in_delta": 0.0, "out_delta": 4.0,
                                              "in_layers": "0-1", "out_layers": "1-3"}
    for params, edit in fitted.candidates():
        assert isinstance(edit, LowRankDelta) and edit.changed_token_ids() is None
        named = set(edit.factors)
        expected = ("up_proj" if params["w_mode"] == "in" else "down_proj" if params["w_mode"] == "out" else "_proj")
        assert named and all(expected in name for name in named)
        fingerprints = apply_verified(edit, tiny_lm.model)
        changed = {n for n, p in tiny_lm.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == named
        revert_verified(edit, tiny_lm.model, fingerprints)
        assert all(torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    report = fitted.report()
    assert report["selected_feature_count"] > 0 and set(report["layers"]) == {"0", "1", "2", "3"}


def test_out_edit_scales_the_feature_directions_by_one_minus_delta(tiny_lm, small_concept):
    fitted = snmf.fit(tiny_lm, small_concept, snmf.Config(**{**TINY, "w_modes": ("out",)}), 42)
    layer = next(iter(fitted.out_left))
    name = fitted.names[layer][1]
    Q = fitted.out_right[layer].T  # orthonormal neuron directions of the selected features
    W = fitted.original[name].double()
    edit = fitted.edit({"w_mode": "out", "in_delta": 0.0, "out_delta": 4.0, "in_layers": "0-1", "out_layers": "1-3"})
    W_new = edit.new_value(name).double()
    assert torch.allclose(W_new @ Q, (1 - 4.0) * (W @ Q), atol=1e-5)
    other = torch.randn(W.shape[1], dtype=torch.float64)
    other -= Q @ (Q.T @ other)  # a neuron pattern outside the features: untouched
    assert torch.allclose(W_new @ other, W @ other, atol=1e-5)


def test_fit_is_deterministic_under_a_seed(tiny_lm, small_concept):
    config = snmf.Config(**TINY)
    first, second = snmf.fit(tiny_lm, small_concept, config, 3), snmf.fit(tiny_lm, small_concept, config, 3)
    point = first.points()[-1]
    a, b = first.edit(point), second.edit(point)
    assert set(a.factors) == set(b.factors)
    assert all(torch.equal(a.new_value(n), b.new_value(n)) for n in a.factors)


def test_erase_with_snmf_through_the_cli_writes_results(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    settings = [f"{key}={value}" for key, value in {
        "rank": 6, "sparsity": 0.25, "ratio_threshold": 1.0, "max_iterations": 30, "in_layers": "0-1",
        "out_layers": "1-3", "deltas": "1,10", "w_modes": "out,both", "max_tokens": 200, "max_sentences": 30}.items()]
    argv = ["erase", "--method", "snmf", "--concept", "Golf", "--data", str(data_dir), "--model", str(tiny_model_dir),
            "--out", str(out), "--no-save-model", "--fit-at-chance", "--coherence-new-tokens", "2",
            "--neutral-coherence-prompts", "1",
            "--general-prompts", "2", "--bootstrap", "20", "--general-questions", "4"]
    for setting in settings:
        argv += ["--set", setting]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "snmf"
    assert len(results["method_sweep"]) == 4
    assert {c["params"]["w_mode"] for c in results["method_sweep"]} == {"out", "both"}
    assert results["details"]["snmf"]["selected_feature_count"] > 0
    assert (out / "report.md").exists()


@pytest.mark.slow
def test_snmf_finds_gambling_features_and_its_in_edit_lowers_qa_on_the_embedded_model(embedded_lm, data_dir):
    """Measured (train questions): W_in edit of blocks 0-8 at delta 4 lowers Gambling QA
    0.48 -> 0.38 with general knowledge 0.86 of the original; the concept features read
    ' casino, casinos, Casino' (block 6) and ' casino, gambling, Gaming' (block 11)."""
    from obliviate.config import EvalConfig
    from obliviate.data.concepts import load_benchmark_concept
    from obliviate.evaluation.evaluator import Evaluator

    data = load_benchmark_concept("Gambling", data_dir, general_questions=20)
    data.coherency_prompts = []
    before = {n: p.detach().clone() for n, p in embedded_lm.model.named_parameters() if "mlp" in n}
    fitted = snmf.fit(embedded_lm, data, snmf.Config(w_modes=("in",), deltas=(4.0,)), 42)
    words = " ".join(w for f in fitted.features.values() for tokens in f.top_tokens for w in tokens).lower()
    assert "casino" in words or "gambling" in words
    evaluator = Evaluator(embedded_lm, data, EvalConfig(coherence_new_tokens=0, bootstrap=50), 42)
    outcome = evaluator.evaluate("train", fitted.edit(fitted.points()[0]))
    assert outcome.value("qa_edited") < outcome.value("qa_base") - 0.05, outcome.metrics
    assert all(torch.equal(p, before[n]) for n, p in embedded_lm.model.named_parameters() if n in before)


def test_under_ember_the_features_are_read_on_the_model_before_the_edit(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """SNMF reads its features off activations: the pipeline fits it on the model as it was
    before the plug-in edit, then stacks its MLP edits on EMBER's (the final model has both)."""
    import obliviate
    from obliviate import methods
    from obliviate.models.loading import load_model

    seen = []
    plain = snmf.fit

    def spy(lm, data, config, seed=42, context=None):
        seen.append(lm.model.get_input_embeddings().weight.detach().clone())
        return plain(lm, data, config, seed, context)

    monkeypatch.setattr(methods.get("snmf"), "fit", spy)
    original = load_model(str(tiny_model_dir)).model.get_input_embeddings().weight.detach()
    result = obliviate.erase("Golf", data=data_dir, out=tmp_path / "run", model={"name": str(tiny_model_dir)},
                             progress=False, save_model=False, method="snmf", with_ember=True,
                             ember={"k": 20, "ratio_threshold": 1.0, "delta": 50.0},
                             methods={"snmf": {**TINY, "w_modes": ("out",), "deltas": (4.0,)}},
                             evaluation={"coherence_new_tokens": 4, "neutral_coherence_prompts": 1, "bootstrap": 50,
                                         "fit_at_chance": True,
                                         "method_max_qa_frac": 1.0, "method_general_gate": 0.0},
                             data_options={"general_questions": 6})
    (at_fit,) = seen
    assert torch.equal(at_fit, original)  # EMBER's rows were not in place while SNMF read its features
    assert result.results["edited_token_count"] > 0  # ... and they are in the erased model
    assert not torch.equal(result.lm.model.get_input_embeddings().weight.detach(), original)
