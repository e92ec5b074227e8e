import numpy as np
import pandas as pd
import pytest
import ray
import torch

from clf import checkpoint, data
from clf.errors import ClfError
from clf.infer import check_complete, placement, predict
from clf.predictor import Predictor
from clf.model import FashionCNN
from clf.plan import InferPlan


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(folder, FashionCNN(channels=(4, 8), hidden=16).eval(), data.CLASSES)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_split():
    rng = np.random.default_rng(7)
    return data.Split(
        images=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        labels=rng.integers(0, 10, 300).astype(np.int64),
    )


def direct(checkpoint_dir, images):
    model, _ = checkpoint.load_model(checkpoint_dir)
    with torch.inference_mode():
        probs = torch.softmax(model(data.preprocess(torch.from_numpy(images))), dim=1)
    confidence, prediction = probs.max(dim=1)
    return prediction.numpy(), confidence.numpy()


def test_predictor_adds_prediction_and_confidence_and_keeps_other_columns(tiny_checkpoint, tiny_split):
    batch = {"id": np.arange(5), "label": tiny_split.labels[:5], "image": tiny_split.images[:5].copy()}
    out = Predictor(checkpoint.read(tiny_checkpoint))(batch)
    assert set(out) == {"id", "label", "prediction", "confidence", "node", "actor"}
    # Where it ran: the node of this process when Ray is up in it (an earlier test of the session may have
    # started it), nowhere otherwise.
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    assert set(out["node"]) == {here}
    prediction, confidence = direct(tiny_checkpoint, tiny_split.images[:5])
    np.testing.assert_array_equal(out["prediction"], prediction)
    np.testing.assert_allclose(out["confidence"], confidence, rtol=1e-5)
    assert ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()


def test_an_incomplete_or_mislabelled_result_is_refused_never_returned():
    expected = pd.DataFrame({"id": [0, 1, 2], "label": [4, 5, 6]})
    rows = pd.DataFrame({"id": [2, 0, 1], "label": [6, 4, 5], "prediction": [6, 4, 0]})
    assert check_complete(rows, expected)["id"].tolist() == [0, 1, 2]  # complete: in id order
    with pytest.raises(ClfError, match="inference returned 2 rows for 3 images"):
        check_complete(rows.iloc[:2], expected)
    with pytest.raises(ClfError, match="inference returned 3 rows for 3 images"):
        check_complete(rows.assign(id=[2, 0, 0]), expected)  # one twice, one missing
    with pytest.raises(ClfError, match="labels that differ from the ones read"):
        check_complete(rows.assign(label=[6, 4, 9]), expected)


@pytest.mark.slow
def test_rows_stay_aligned_when_shuffled_before_inference(ray_local, tiny_checkpoint, tiny_split):
    prediction, confidence = direct(tiny_checkpoint, tiny_split.images)
    assert len(np.unique(prediction)) >= 3  # otherwise a misalignment could go unseen

    shuffled = data.to_ray_dataset(tiny_split, rows_per_block=50).random_shuffle(seed=1)
    rows = predict(shuffled, checkpoint.read(tiny_checkpoint), InferPlan(num_actors=1, cpus_per_actor=1, use_gpu=False), batch_size=32)
    rows = rows.to_pandas()

    assert sorted(rows["id"]) == list(range(300))
    assert not (rows["id"].to_numpy() == np.arange(300)).all()  # the order really was shuffled
    ids = rows["id"].to_numpy()
    np.testing.assert_array_equal(rows["label"].to_numpy(), tiny_split.labels[ids])
    np.testing.assert_array_equal(rows["prediction"].to_numpy(), prediction[ids])
    # Confidences are all but unique per image: a row paired with another image's output shows here.
    np.testing.assert_allclose(rows["confidence"].to_numpy(), confidence[ids], rtol=1e-5)
    assert [a["rows"] for a in placement(rows)] == [300]  # the one actor, on the one node
    assert placement(rows)[0]["node"] == ray_local.get_runtime_context().get_node_id()
