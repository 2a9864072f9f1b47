import numpy as np
import torch

from obliviate.methods.features import BOTH, CONCEPT, NEUTRAL, build_token_set, feature_ratios, select_features
from obliviate.methods import ember


def test_labels_with_and_without_the_contrast_sets(tiny_tokenizer):
    concept = ["wizards cast spells", "the wizard reads"]
    neutral = ["the river reads"]
    contrast = ["golfers cast a line"]
    ts = build_token_set(tiny_tokenizer, concept, neutral, contrast)
    label = {tiny_tokenizer.decode([int(t)]): (ts.labels[i], ts.reference_labels[i]) for i, t in enumerate(ts.ids)}
    # The tiny BPE splits words: "reads" = " re"+"ad"+"s", "river" = " r"+"i"+"ver", "cast" = " c"+"ast".
    assert label[" re"] == (BOTH, BOTH)  # in concept and neutral sentences
    assert label["ver"] == (NEUTRAL, NEUTRAL)
    assert label["ast"] == (BOTH, CONCEPT)  # concept-only for the paper, shared with another concept here
    assert label["iz"] == (CONCEPT, CONCEPT)
    counts = dict(zip(ts.ids.tolist(), ts.concept_occurrences.tolist()))
    iz = tiny_tokenizer("iz", add_special_tokens=False).input_ids[0]
    assert counts[iz] == 2.0 and ts.n_concept_sentences == 2


def test_ratio_is_mean_magnitude_over_concept_over_negatives():
    G = torch.tensor([[2.0, 0.0], [-4.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    concept = np.array([True, True, False, False])
    ratios = feature_ratios(G, concept, ~concept)
    np.testing.assert_allclose(ratios, [3.0 / (0.5 + 1e-8), 0.5 / (2.0 + 1e-8)], rtol=1e-6)


def test_contrast_selection_keeps_strong_concept_features_only(tiny_tokenizer):
    sentences = ["alpha beta gamma"] * 3
    ts = build_token_set(tiny_tokenizer, sentences, ["delta epsilon zeta eta"], [])
    n = len(ts.ids)
    concept = ts.mask(CONCEPT)
    G = torch.zeros(n, 3)
    G[concept, 0] = 1.0  # on concept tokens only: high ratio, high usage
    G[~concept, 1] = 1.0  # on neutral tokens only: ratio ~0
    G[np.nonzero(concept)[0][:1], 2] = 0.1  # concept-only but barely used
    G[~concept, 2] = 0.005
    selected, described = select_features(G, ts, tiny_tokenizer, "contrast", 2.0, 0.25)
    assert [f.index for f in selected] == [0]
    assert described[2].ratio >= 2.0  # passes the ratio, fails the usage floor
    reference, _ = select_features(G, ts, tiny_tokenizer, "reference", 2.0)
    assert {f.index for f in reference} == {0, 2}


def test_judge_mode_scores_candidates_with_a_local_model(tiny_lm, small_concept):
    config = ember.Config(k=20, selection="judge", judge_model="self", judge_confidence=0.0)
    fit = ember.fit(tiny_lm, small_concept, config)
    assert fit.features and all(0.0 <= f.judge_confidence <= 1.0 for f in fit.features)
    strict = ember.fit(tiny_lm, small_concept, ember.Config(k=20, selection="judge", judge_model="self", judge_confidence=1.0))
    assert strict.features == []
