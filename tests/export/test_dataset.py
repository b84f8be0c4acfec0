from export import corpus, dataset


def test_the_evaluation_splits_do_not_depend_on_the_training_seed():
    """Corpora with fresh training utterances (another --seed) still speak the same evaluation set."""
    plans = [dataset.plan(dataset.DataSettings(seed=seed, count=1000)) for seed in (0, 19)]
    evals = [[job for job in jobs if job.split != "train"] for jobs in plans]
    assert evals[0] == evals[1]
    assert {job.split for job in evals[0]} == {"eval-seen", "eval-heldout"}
    size = len(corpus.eval_utterances())
    assert all(job.size == size and job.seed == dataset.EVAL_SEED for job in evals[0])
    trains = [[job.seed for job in jobs if job.split == "train"] for jobs in plans]
    assert trains == [[0, 0], [19, 19]]
