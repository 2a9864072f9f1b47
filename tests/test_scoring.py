import numpy as np
import torch

from obliviate.data.concepts import MCQuestion
from obliviate.evaluation.multiple_choice import correct_from_scores, option_scores, prepare, shuffled_order
from obliviate.evaluation.scoring import (CPU_GENERATION_BATCH_TOKENS, ROWS_PER_REDUCTION, Batching,
                                         continuation_logprobs, greedy_generate, log_normalizer)


@torch.no_grad()
def naive_logprob(lm, context, continuation):
    ids = torch.tensor([context + continuation])
    logits = lm.model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(context) - 1 + t, tok]) for t, tok in enumerate(continuation))


def test_batched_left_padded_scores_equal_one_at_a_time_scores(tiny_lm):
    tok = tiny_lm.tokenizer
    items = [
        (tok("Question: who?\nAnswer:").input_ids, tok(" a wizard", add_special_tokens=False).input_ids),
        (tok("Question: a much longer question about golf clubs?\nAnswer:").input_ids, tok(" iron", add_special_tokens=False).input_ids),
        (tok("Q:").input_ids, tok(" the river of the north", add_special_tokens=False).input_ids),
    ]
    for budget in (16, 4096):  # one item per batch, and all together
        batched = continuation_logprobs(tiny_lm, items, Batching(budget)).numpy()
        naive = np.array([naive_logprob(tiny_lm, c, x) for c, x in items])
        np.testing.assert_allclose(batched, naive, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_unbatched_generation(tiny_lm):
    prompts = [tiny_lm.tokenizer(p).input_ids for p in ("The wizard", "Golf is a sport played on a long")]
    together = greedy_generate(tiny_lm, prompts, 6, Batching(4096))
    alone = [greedy_generate(tiny_lm, [p], 6, Batching(4096))[0] for p in prompts]
    assert together == alone
    assert all(0 < len(c) <= 6 for c in together)
    # on a CPU, generation takes larger batches than scoring unless a budget is given
    assert Batching().generation_budget(tiny_lm) == CPU_GENERATION_BATCH_TOKENS > Batching().budget(tiny_lm)
    assert Batching(16).generation_budget(tiny_lm) == 16
    assert greedy_generate(tiny_lm, prompts, 6) == greedy_generate(tiny_lm, prompts, 6, Batching(16)) == alone


def test_options_are_shuffled_with_a_fixed_seed_and_answers_follow():
    q = MCQuestion("Which?", ("right", "w1", "w2", "w3"), 0)
    assert shuffled_order(q, 0) == shuffled_order(q, 0)
    orders = {tuple(shuffled_order(MCQuestion(f"Q{i}", q.options, 0), 0)) for i in range(40)}
    firsts = [o.index(0) for o in orders]
    assert len(orders) > 10 and len(set(firsts)) == 4  # the correct option lands everywhere


def test_loglik_scoring_picks_the_option_the_model_prefers(tiny_lm):
    tok = tiny_lm.tokenizer
    questions = [MCQuestion("What is it?", ("alpha", "beta beta beta", "gamma", "delta"), 1)]
    prepared = prepare(tiny_lm, questions, "loglik", seed=3)
    scores = option_scores(tiny_lm, prepared)
    context = tok("Question: What is it?\nAnswer:").input_ids
    order = shuffled_order(questions[0], 3)
    expected = [naive_logprob(tiny_lm, context, tok(f" {questions[0].options[i]}", add_special_tokens=False).input_ids)
                / (len(questions[0].options[i]) + 1) for i in order]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-5)
    assert correct_from_scores(prepared, scores)[0] == (int(np.argmax(expected)) == order.index(1))


def test_partial_rescoring_leaves_other_rows_unscored(tiny_lm):
    questions = [MCQuestion(f"Question {i}?", ("a", "b", "c", "d"), 0) for i in range(4)]
    prepared = prepare(tiny_lm, questions, "loglik")
    scores = option_scores(tiny_lm, prepared, np.array([1, 3]))
    assert np.isnan(scores[[0, 2]]).all() and np.isfinite(scores[[1, 3]]).all()


def test_options_sharing_a_context_score_as_if_run_whole(tiny_lm, tiny_llama):
    """Shared contexts run once with a cache (contexts of different lengths, options of
    different lengths, and a lone item in the same call): same sums as one at a time."""
    for lm in (tiny_lm, tiny_llama):
        tok = lm.tokenizer
        short = tok("Question: who?\nAnswer:").input_ids
        long = tok("Question: a much longer question about the golf clubs of Scotland?\nAnswer:").input_ids
        options = [tok(f" {o}", add_special_tokens=False).input_ids for o in ("a wizard", "iron", "the river of the north")]
        items = [(short, o) for o in options] + [(long, o) for o in options[:2]] + [(tok("Q:").input_ids, options[2])]
        fed, projected = [], []  # real (non-pad) tokens of every forward call; the output layer's rows
        pad = tok.pad_token_id
        hook = lm.model.register_forward_pre_hook(
            lambda _m, _a, kwargs: fed.append(int((kwargs["input_ids"] != pad).sum())), with_kwargs=True)
        head = lm.model.get_output_embeddings().register_forward_hook(
            lambda _m, _a, out: projected.append(out.shape[0] * out.shape[1]))
        try:
            for budget in (24, 4096):  # one context per batch, and all together
                fed.clear()
                projected.clear()
                shared = continuation_logprobs(lm, items, Batching(budget)).numpy()
                # each distinct context is fed once, each option once but its last token (it
                # predicts nothing)
                assert sum(fed) == len(short) + len(long) + len(tok("Q:").input_ids) + sum(len(x) - 1 for _, x in items)
                # the output layer runs once per scored token, never on padding: a shared
                # context's last position predicts its options' first tokens
                assert sum(projected) == 2 + sum(len(x) - 1 for _, x in items[:5]) + len(items[5][1])
                naive = np.array([naive_logprob(lm, c, x) for c, x in items])
                np.testing.assert_allclose(shared, naive, rtol=1e-4, atol=1e-4)
        finally:
            hook.remove()
            head.remove()


def test_output_states_recorded_while_scoring_equal_a_separate_capture(tiny_lm):
    """What the output layer saw at each scored position, kept from the scoring pass (shared
    contexts and whole sequences), equals capturing it in a pass of its own."""
    from obliviate.evaluation.output_rows import capture_output_states

    tok = tiny_lm.tokenizer
    question = tok("Question: which club is used to putt?\nAnswer:").input_ids
    options = [tok(f" {o}", add_special_tokens=False).input_ids for o in ("a putter", "the driver of the ball", "iron")]
    options.append(options[0][:1])  # one token: scored from the context's last position alone
    items = [(question, o) for o in options] + [(tok("Q:").input_ids, options[1]), (tok("Q:").input_ids[:2], options[3])]
    for budget in (24, 4096):
        totals, states = continuation_logprobs(tiny_lm, items, Batching(budget), record=True)
        np.testing.assert_array_equal(totals.numpy(), continuation_logprobs(tiny_lm, items, Batching(budget)).numpy())
        captured = capture_output_states(tiny_lm, [c + x[:-1] for c, x in items], [len(x) for _, x in items])
        for kept, separate, (_, option) in zip(states, captured, items):
            assert kept.hidden.shape == (len(option), tiny_lm.model.config.hidden_size) and kept.log_norm.dtype == torch.float64
            torch.testing.assert_close(kept.hidden, separate.hidden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(kept.log_norm, separate.log_norm, atol=1e-4, rtol=1e-5)
        naive = np.array([naive_logprob(tiny_lm, c, x) for c, x in items])
        np.testing.assert_allclose(totals.numpy(), naive, rtol=1e-4, atol=1e-4)


def test_log_normalizer_in_row_blocks_equals_one_reduction():
    """Reduced a few rows at a time on a CPU: the very values of one logsumexp, for row counts
    that leave a remainder of one row, of several, or none."""
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 2, ROWS_PER_REDUCTION, ROWS_PER_REDUCTION + 1, 2 * ROWS_PER_REDUCTION + 3, 113):
        logits = torch.randn(rows, 4099, generator=generator) * 6
        assert torch.equal(log_normalizer(logits), torch.logsumexp(logits, dim=-1))


def test_a_tied_edit_needs_no_second_pass_for_the_output_states(tiny_lm, small_concept, monkeypatch):
    """The original's output states come from its scoring pass: correcting a tied edit's
    untouched questions runs no capture pass."""
    from obliviate.config import EvalConfig
    from obliviate.edits.embedding import EmbeddingPatch
    from obliviate.evaluation import evaluator as evaluator_module
    from obliviate.evaluation.evaluator import Evaluator

    def no_second_pass(*args, **kwargs):
        raise AssertionError("a second pass over the original's questions")

    monkeypatch.setattr(evaluator_module, "capture_output_states", no_second_pass)
    evaluator = Evaluator(tiny_lm, small_concept, EvalConfig(scoring="loglik", coherence_new_tokens=0, bootstrap=20,
                                                             cache=False))
    weight = tiny_lm.model.get_input_embeddings().weight
    tokens = torch.tensor([7, 11, 13])
    rows = weight[tokens].detach().clone()
    patch = EmbeddingPatch(token_ids=tokens, original_rows=rows, edited_rows=rows * 30.0, metadata={})
    outcome = evaluator.evaluate("train", patch)
    assert sum(outcome.rescored.values()) < sum(len(q) for q in evaluator.question_sets("train").values())
