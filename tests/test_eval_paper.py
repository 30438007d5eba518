"""The paper command: all four tables end to end on tiny fixtures; missing inputs give "not run"."""
import json
import warnings

import cv2
import numpy as np
import pytest

from data.coco import load_coco, save_coco
from data.demo import DemoConfig, make_demo_dataset
from eval.paper import PaperConfig, main
from eval.report import bar_chart, markdown_table


def _grouped(root, seed, per_condition=2):
    """A demo COCO whose images carry condition_id / sample_index, as the synthesis stage writes."""
    make_demo_dataset(DemoConfig(out=str(root), size=64, num_defective=6, num_free=0, seed=seed), progress=False)
    data = load_coco(root / "annotations.json", check_images=False, progress=False)
    for i, image in enumerate(data["images"]):
        image["condition_id"], image["sample_index"] = i // per_condition, i % per_condition
    save_coco(data, root / "samples.json")
    return root / "samples.json"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    make_demo_dataset(DemoConfig(out=str(root / "real"), size=64, num_defective=6, num_free=0, seed=11), progress=False)
    no_concept = root / "no_concept"
    no_concept.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(no_concept / f"{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return {"real": root / "real" / "annotations.json", "synthetic": _grouped(root / "synthetic", 12),
            "baseline": _grouped(root / "baseline", 13), "no_concept": no_concept}


def test_report_helpers(tmp_path):
    text = markdown_table(["a", "b"], [["x", 0.12345], ["y", float("nan")]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.123 |", "| y | n/a |"]
    path = bar_chart(tmp_path / "c.png", ["g1", "g2"], {"s1": [1.0, 2.0], "s2": [0.5, None]}, "title")
    image = cv2.imread(str(path))
    assert image.shape == (480, 900, 3) and image.std() > 0


def test_missing_inputs_are_written_as_not_run(inputs, tmp_path):
    cfg = PaperConfig(data="", out=str(tmp_path / "r"), inception_weights=str(tmp_path / "nowhere"), progress=False)
    report = main(cfg)
    text = (tmp_path / "r" / "report.md").read_text()
    assert report["tables"]["1"] == {"not_run": "no --data (real annotated COCO) given"}
    assert "not run: no --data" in (tmp_path / "r" / "table2.md").read_text()
    assert "not run: no --synthetic or --diversity-samples" in text and "not run: no --baseline given" in text
    assert "not run: no --synthetic-no-concept given" in text
    assert "paper*" in text and "in-house data" in text
    # Inception weights missing: the FID cells say so (with the file name), diversity still runs.
    cfg = PaperConfig(data=str(inputs["real"]), synthetic=str(inputs["synthetic"]), tables=("3", "4"),
                      out=str(tmp_path / "r2"), inception_weights=str(tmp_path / "nowhere"), conditions=2,
                      per_condition=2, diversity_size=32, progress=False)
    report = main(cfg)
    ours = report["tables"]["3"]["rows"][0]["entry"]
    assert ours["mean_l2"] > 0 and "pt_inception-2015-12-05-6726825d.pth" in ours["distance"]["not_run"]
    assert "not_run" in report["tables"]["4"]["rows"][0]["entry"]
    json.loads((tmp_path / "r2" / "report.json").read_text())  # strict JSON


@pytest.mark.slow
def test_all_four_tables_end_to_end(inputs, tmp_path):
    cfg = PaperConfig(data=str(inputs["real"]), synthetic=str(inputs["synthetic"]), baseline=str(inputs["baseline"]),
                      synthetic_small=str(inputs["baseline"]), synthetic_no_concept=str(inputs["no_concept"]),
                      out=str(tmp_path / "report"),
                      real_fraction=0.5, iterations=1, batch_size=1, min_size=64, max_size=64, rois_per_image=32,
                      detections_per_image=10, test_fraction=0.34, feature_extractor="pixels", kid_subsets=5,
                      conditions=2, per_condition=2, diversity_size=32, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FD at N < d
        report = main(cfg)
    out = tmp_path / "report"
    for t in "1234":
        assert (out / f"table{t}.md").is_file()
        assert "not run" not in (out / f"table{t}.md").read_text(), t
    t1 = report["tables"]["1"]["rows"]
    assert [r["training data"] for r in t1] == ["synthetic", "real (100% real)", "synthetic+real (100% real)"]
    assert all(0 <= r["entry"]["mean"]["segm_map"] <= 1 for r in t1)
    t2 = report["tables"]["2"]["rows"]
    assert t2[1]["training data"] == "real (50% real)"
    # provenance: Table 1's synthetic rows name --synthetic, Table 2's --synthetic-small; one test set
    assert t1[0]["provenance"]["synthetic"]["set"] == str(inputs["synthetic"])
    assert t2[0]["provenance"]["synthetic"]["set"] == t2[2]["provenance"]["synthetic"]["set"] == str(inputs["baseline"])
    test_sets = {r["provenance"]["test_set"]["set"] for r in t1 + t2}
    assert test_sets == {str(out / "splits" / "real_test.json")}
    small = json.loads((out / "splits" / "real_small.json").read_text())["images"]
    assert t2[1]["provenance"]["maskrcnn_training"][0]["images"] == len(small) == 2  # ceil(0.5 x 4)
    test_names = {im["file_name"] for im in json.loads((out / "splits" / "real_test.json").read_text())["images"]}
    assert not test_names & {im["file_name"] for im in small}
    t3 = report["tables"]["3"]["rows"]
    assert t3[0]["entry"]["distance"]["label"] == "FD-pixels" and t3[0]["entry"]["distance"]["n_fake"] == 4
    assert t3[1]["entry"]["conditions"] == 2
    t4 = report["tables"]["4"]["rows"]
    assert [r["entry"]["n_fake"] for r in t4] == [6, 4, 6]
    assert [r["source"] for r in t4] == [str(inputs["baseline"]), str(inputs["no_concept"]), str(inputs["synthetic"])]
    assert "Where these numbers come from" in (out / "table4.md").read_text()
    text = (out / "report.md").read_text()
    assert "FD-pixels ↓" in text and "KD-pixels ↓" in text and "FID ↓" not in text  # never passed off as FID
    assert "| 0.06 | 0.12 | 80.6 | 0.29 |" in text  # the paper's reference columns
    plots = {p.split("/")[-1] for p in report["plots"]}
    assert {"table1_metrics.png", "table1_per_class_segm_ap.png", "table2_metrics.png", "table3_l2.png",
            "table3_mi.png", "table4_fid.png"} <= plots
    assert json.loads((out / "report.json").read_text())["tables"]["4"]["rows"][0]["entry"]["label"] == "FD-pixels"
