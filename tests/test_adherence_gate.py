"""sample.synthesize --min-adherence: outputs below the adherence gate are redrawn with derived
seeds (as the blank guard does); after --retries a row keeps its best draw; every image records its
score. The sampler is faked (seeded noise images) and the scores scripted per attempt, so the test
checks the bookkeeping; the real score is checked on a pair's own images."""
import numpy as np
import pytest

import sample.sadf_inputs as sadf_inputs
import sample.synthesize as synthesize
from data.images import read_image
from sample.records import read_records
from sample.sadf_jobs import job_seed
from sample.synthesize import SynthesisError, main, regenerate
from tests.test_synthesize import SEED, config, fake_images, inputs  # noqa: F401 (the module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gate_redraws_then_keeps_the_best_draw_and_records_scores(inputs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sadf_inputs, "generate", lambda *a, seeds, **k: fake_images(seeds))
    attempts = []

    def scripted(pixels, rows, driver_config):  # attempt 0: all below 0.5; attempt 1: pair 0 passes
        attempts.append([r.pair_id for r in rows])
        if len(attempts) == 1:
            return [0.3] * len(rows)
        return [0.9 if r.pair_id == 0 else 0.1 for r in rows]

    monkeypatch.setattr(synthesize, "adherence_scores", scripted)
    out = tmp_path / "gate"
    result = main(config(inputs, out, min_adherence=0.5, retries=1, batch=8))
    assert result.dropped == 0 and result.retried == 8 and len(attempts) == 2
    records = read_records(out)
    for record in records.values():
        assert record["status"] == "ok" and len(record["rejected"]) >= 1
        assert record["rejected"][0]["reason"] == "adherence 0.300 < 0.5"
        if record["pair_id"] == 0:  # the redraw passed the gate
            assert (record["attempt"], record["adherence"]) == (1, 0.9)
            assert record["seed"] == job_seed(SEED, 0, record["sample_index"], attempt=1)
        else:  # both draws below the gate: the better one (attempt 0, 0.3 > 0.1) is kept
            assert (record["attempt"], record["adherence"]) == (0, 0.3) and len(record["rejected"]) == 2
    kept = next(r for r in records.values() if r["pair_id"] != 0)
    assert np.array_equal(regenerate(out, kept["image_id"], device="cpu"), read_image(out / kept["file_name"]))
    with pytest.raises(SynthesisError, match="--min-adherence is an adherence score in"):
        main(config(inputs, tmp_path / "bad", min_adherence=1.5))


def test_real_scores_rank_a_pair_source_above_noise(inputs):  # noqa: F811
    import torch

    from sample.synthesize import prepare

    run = prepare(config(inputs, "unused", resolution=64), torch.device("cpu"), torch.float32, load=False,
                  check_images=False)
    row = run.builder(0)
    pair = run.builder.pairs.build(0)
    noise = (np.random.default_rng(0).random(pair.image.shape) * 255).astype(np.uint8)
    # the defect-free variant the driver was made from has the driver's topology exactly (A = 1)
    source, random = sadf_inputs.adherence_scores([pair.image, noise], [row, row], run.builder.pairs.config.driver)
    assert source >= 0.5 > random
