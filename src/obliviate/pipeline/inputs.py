"""A run's concept data, from the benchmark folder (``--data``, else the one shipped with
obliviate) or the user's own files, with the general prompts its coherence is measured on
attached (every command that runs models starts here)."""
from __future__ import annotations

from obliviate.config import RunConfig
from obliviate.data.concepts import ConceptData, attach_general_prompts, load_benchmark_concept, load_user_concept


def load_concept_data(config: RunConfig, concept: str | None = None) -> ConceptData:
    """The data of ``concept`` (default: the run's); every concept the run erases is left out
    of its general knowledge, general prompts and contrast sentences."""
    d, concept = config.data, concept or config.concept
    others = [name for name in config.all_concepts() if name != concept]
    if d.concept_sentences:
        data = load_user_concept(
            concept, d.concept_sentences, d.neutral_sentences, d.data, d.questions,
            d.concept_prompts, d.general_questions_file, d.general_questions, config.seed, others,
        )
    else:  # a benchmark concept, named without regard to case
        data = load_benchmark_concept(concept, d.data_dir(), d.general_questions, d.general_questions_file, config.seed,
                                      others)
    ev = config.evaluation
    attach_general_prompts(data, d.coherence_prompts, ev.general_prompts, ev.neutral_coherence_prompts, config.seed,
                           others)
    return data
