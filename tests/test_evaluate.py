"""Evaluation: pairing (the Cityscapes layout included), the label map, the confusion matrix and the
metrics against a brute-force numpy computation, and the whole evaluate_files pipeline on a synthetic
dataset that the tests write."""
import os

import numpy as np
import pytest
import torch

from hrnet_fast.evaluate import (METRIC_KEYS, DatasetError, LabelPreparer, accumulate_confusion,
                                 evaluate_files, label_lookup_table,
                                 metrics_from_confusion, metrics_table, pair_images_and_labels)
from hrnet_fast.imageio import CITYSCAPES_CLASSES, ImageReadError
from hrnet_fast.infer import BLACK, Item, normalize
from hrnet_fast.tta import TTA, predict_logits
from test_tta import PoolNet


def write_ppm(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w, _ = img.shape
    with open(path, "wb") as f:
        f.write(f"P6\n{w} {h}\n255\n".encode() + img.tobytes())


def write_npy(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, arr)


def brute_force_metrics(preds, labels, num_classes, ignore):
    """Metrics counted pixel by pixel with np.add.at and per-class Python loops (no torch)."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for p, l in zip(preds, labels):
        keep = l != ignore
        np.add.at(cm, (l[keep].astype(np.int64), p[keep].astype(np.int64)), 1)
    iou, acc = [], []
    for c in range(num_classes):
        tp = int(sum(((p == c) & (l == c)).sum() for p, l in zip(preds, labels)))
        fp = int(sum(((p == c) & (l != c) & (l != ignore)).sum() for p, l in zip(preds, labels)))
        fn = int(sum(((p != c) & (l == c)).sum() for p, l in zip(preds, labels)))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        if tp + fn:
            acc.append(tp / (tp + fn))
    present = [v for v in iou if v is not None]
    labelled = sum(int((l != ignore).sum()) for l in labels)
    return {"miou": sum(present) / len(present), "iou": iou,
            "pixel_accuracy": int(np.trace(cm)) / labelled, "mean_accuracy": sum(acc) / len(acc),
            "confusion_matrix": cm.tolist(), "images": len(preds)}


def assert_metrics_equal(got, want):
    assert list(got) == list(METRIC_KEYS)
    assert got["confusion_matrix"] == want["confusion_matrix"] and got["images"] == want["images"]
    assert [v is None for v in got["iou"]] == [v is None for v in want["iou"]]
    assert [v for v in got["iou"] if v is not None] == pytest.approx(
        [v for v in want["iou"] if v is not None], rel=1e-12)
    for key in ("miou", "pixel_accuracy", "mean_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_metrics_against_brute_force_with_ignored_and_absent_classes():
    rng = np.random.default_rng(0)
    c, ignore = 6, 255
    preds = [rng.integers(0, 4, (7, 9)) for _ in range(3)]          # never predicts 4 or 5
    labels = [rng.choice([0, 1, 2, 3, 4, ignore], (7, 9)) for _ in range(3)]  # class 5 never labelled
    cm = torch.zeros((c, c), dtype=torch.int64)
    for p, l in zip(preds, labels):
        target = torch.from_numpy(np.where(l == ignore, -1, l).astype(np.int16))
        accumulate_confusion(cm, torch.from_numpy(p), target)
    got = metrics_from_confusion(cm, 3)
    want = brute_force_metrics(preds, labels, c, ignore)
    assert_metrics_equal(got, want)
    assert got["iou"][5] is None and got["iou"][4] == 0.0  # absent from both vs labelled, never predicted


def test_confusion_accumulates_exactly_in_int64():
    """Counts beyond 2^53 (where float64 stops being exact, and far beyond float32's 2^24)."""
    big = 2 ** 60
    cm = torch.full((3, 3), big, dtype=torch.int64)
    accumulate_confusion(cm, torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 2, 2, -1]], dtype=torch.int16))
    want = torch.full((3, 3), big, dtype=torch.int64)
    want[0, 0] += 1
    want[2, 1] += 1
    want[2, 2] += 1
    assert cm.dtype == torch.int64 and torch.equal(cm, want)
    assert metrics_from_confusion(cm, 1)["confusion_matrix"][2][1] == big + 1


def test_metrics_of_an_empty_matrix_are_none():
    m = metrics_from_confusion(torch.zeros((2, 2), dtype=torch.int64), 0)
    assert m["miou"] is None and m["iou"] == [None, None]
    assert m["pixel_accuracy"] is None and m["mean_accuracy"] is None


def test_cityscapes_label_map_sends_each_evaluated_class_to_its_train_id():
    # Cityscapes' label ids of the 19 evaluated classes, by name (cityscapesScripts' labels.py).
    ids = {"road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17,
           "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
           "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31,
           "motorcycle": 32, "bicycle": 33}
    table = label_lookup_table("cityscapes", 255)
    assert len(table) == 34
    for name, label_id in ids.items():
        assert table[label_id] == CITYSCAPES_CLASSES.index(name), name
    ignored = set(range(34)) - set(ids.values())  # unlabeled, ego vehicle, parking, guard rail, ...
    assert all(table[i] == 255 for i in ignored)
    assert label_lookup_table("cityscapes", -1)[0] == -1  # ignored ids follow the ignore index
    assert label_lookup_table("none", 255) is None
    with pytest.raises(DatasetError, match="unknown label map 'ade'"):
        label_lookup_table("ade", 255)


def test_label_preparer_maps_ignores_and_refuses_out_of_range_ids(tmp_path):
    path = str(tmp_path / "l.npy")
    np.save(path, np.array([[7, 0, 33], [26, 1, 9]], np.uint8))
    item = Item("img.ppm", "l", path)
    got = LabelPreparer(19, 255, "cityscapes")(item, (2, 3))
    assert got.dtype == np.int16 and got.tolist() == [[0, -1, 18], [13, -1, -1]]
    np.save(path, np.array([[7, 0, 33], [26, 255, 9]], np.uint8))  # train ids' 255 is no label id
    with pytest.raises(DatasetError, match="id 255 is not a cityscapes label id"):
        LabelPreparer(19, 255, "cityscapes")(item, (2, 3))
    np.save(path, np.array([[1, 0, 255], [2, 3, 1]], np.uint8))
    assert LabelPreparer(4, 255)(item, (2, 3)).tolist() == [[1, 0, -1], [2, 3, 1]]
    with pytest.raises(DatasetError, match="class id 3 is outside 0..2 and is not the ignore index 255"):
        LabelPreparer(3, 255)(item, (2, 3))
    with pytest.raises(DatasetError, match=r"is 3x2 \(WxH\) but its image img.ppm is 4x2"):
        LabelPreparer(4, 255)(item, (2, 4))


def test_cityscapes_layout_pairs_label_ids_and_ignores_other_ground_truth(tmp_path):
    img = np.zeros((4, 6, 3), np.uint8)
    lab = np.zeros((4, 6), np.uint8)
    names = [("frankfurt", "frankfurt_000000_000294"), ("frankfurt", "frankfurt_000001_007973"),
             ("lindau", "lindau_000000_000019")]
    for city, stem in names:
        write_ppm(tmp_path / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.ppm", img)
        gt = tmp_path / "gtFine/val" / city
        for kind in ("labelIds", "color", "instanceIds", "labelTrainIds"):  # what gtFine/ holds
            write_npy(gt / f"{stem}_gtFine_{kind}.npy", lab)
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    items = pair_images_and_labels(str(tmp_path / "leftImg8bit/val"), str(tmp_path / "gtFine/val"))
    assert [i.name for i in items] == [stem for _, stem in names]
    for item, (city, stem) in zip(items, names):
        assert item.path.endswith(os.path.join(city, f"{stem}_leftImg8bit.ppm"))
        assert item.label.endswith(os.path.join(city, f"{stem}_gtFine_labelIds.npy"))


def test_plain_names_pair_by_stem_and_problems_are_named(tmp_path):
    img = np.zeros((4, 6, 3), np.uint8)
    write_ppm(tmp_path / "im/a.ppm", img)
    write_ppm(tmp_path / "im/b.ppm", img)
    write_npy(tmp_path / "lab/a.npy", np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match=r"1 of 2 images have no label map in .*lab: first .*b\.ppm"):
        pair_images_and_labels(str(tmp_path / "im"), str(tmp_path / "lab"))
    write_npy(tmp_path / "lab/sub/b.npy", np.zeros((4, 6), np.uint8))
    assert [i.name for i in pair_images_and_labels(str(tmp_path / "im"), str(tmp_path / "lab"))] == ["a", "b"]
    write_npy(tmp_path / "lab/b_gtFine_labelIds.npy", np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match="matches several label maps"):
        pair_images_and_labels(str(tmp_path / "im"), str(tmp_path / "lab"))
    os.remove(tmp_path / "lab/b_gtFine_labelIds.npy")
    write_ppm(tmp_path / "im/x/a_leftImg8bit.ppm", img)
    with pytest.raises(DatasetError, match="the same key 'a'"):
        pair_images_and_labels(str(tmp_path / "im"), str(tmp_path / "lab"))
    with pytest.raises(DatasetError, match="labels folder .*nowhere: not found"):
        pair_images_and_labels(str(tmp_path / "im"), str(tmp_path / "nowhere"))


def make_dataset(root, sizes, num_classes, ignore=255, seed=0):
    """Images (PPM) and label maps (.npy) with ignored pixels; returns the paired items."""
    rng = np.random.default_rng(seed)
    for k, (h, w) in enumerate(sizes):
        write_ppm(root / "images" / f"im{k}.ppm", (rng.random((h, w, 3)) * 255).astype(np.uint8))
        lab = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
        lab[rng.random((h, w)) < 0.2] = ignore
        write_npy(root / "labels" / f"im{k}.npy", lab)
    return pair_images_and_labels(str(root / "images"), str(root / "labels"))


def predictions_one_by_one(model, items, tta):
    """Each image predicted on its own, with the TTA function tested in test_tta.py."""
    from hrnet_fast.imageio import read_rgb
    preds = []
    with torch.no_grad():
        for item in items:
            x = normalize(torch.from_numpy(read_rgb(item.path))[None], torch.float32)
            preds.append(predict_logits(model, x, tta, pad_value=BLACK).argmax(1)[0].numpy())
    return preds


@pytest.mark.parametrize("batch, workers, tta", [
    (1, 0, TTA()),
    (3, 1, TTA(scales=(0.75, 1.0), flip=True, crop=(16, 16), stride=(12, 12))),
])
def test_evaluate_files_equals_brute_force(tmp_path, batch, workers, tta):
    sizes = [(20, 28), (24, 24), (20, 28), (20, 28), (17, 31)]  # batches mix sizes
    items = make_dataset(tmp_path, sizes, num_classes=4)
    model = PoolNet(num_classes=4)
    result = evaluate_files(items, model, ignore_index=255, tta=tta, batch_size=batch,
                            workers=workers, progress=False)
    preds = predictions_one_by_one(model, items, tta)
    labels = [np.load(i.label) for i in items]
    assert_metrics_equal(result.metrics, brute_force_metrics(preds, labels, 4, 255))
    assert sorted(result.names) == sorted(i.name for i in items)


def test_evaluate_files_counts_in_int64(tmp_path, monkeypatch):
    """float32 counts stop being exact at 2^24 pixels per cell: eight Cityscapes images of one class."""
    import hrnet_fast.evaluate as evaluate
    seen = []
    real = evaluate.accumulate_confusion

    def spy(confusion, predictions, targets):
        seen.append(confusion.dtype)
        return real(confusion, predictions, targets)

    monkeypatch.setattr(evaluate, "accumulate_confusion", spy)
    items = make_dataset(tmp_path, [(8, 8), (8, 8)], num_classes=4)
    m = evaluate_files(items, PoolNet(), progress=False).metrics
    assert seen == [torch.int64, torch.int64]
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)


def test_a_label_of_another_size_stops_the_evaluation(tmp_path):
    items = make_dataset(tmp_path, [(20, 28), (20, 28)], num_classes=4)
    np.save(items[1].label, np.zeros((20, 27), np.uint8))
    with pytest.raises(DatasetError, match=r"im1.npy is 27x20 \(WxH\) but its image .*im1.ppm is 28x20"):
        evaluate_files(items, PoolNet(), progress=False)


def test_an_unreadable_image_stops_the_evaluation(tmp_path):
    items = make_dataset(tmp_path, [(20, 28), (20, 28)], num_classes=4)
    with open(items[0].path, "r+b") as f:
        f.truncate(30)
    with pytest.raises(DatasetError, match="im0.ppm: truncated"):
        evaluate_files(items, PoolNet(), progress=False)


def test_num_classes_must_match_the_model(tmp_path):
    items = make_dataset(tmp_path, [(8, 8)], num_classes=3)
    with pytest.raises(DatasetError, match="num_classes=3 but the model predicts 4"):
        evaluate_files(items, PoolNet(num_classes=4), num_classes=3, progress=False)


def test_table_names_cityscapes_classes_and_marks_undefined_values():
    cm = torch.zeros((19, 19), dtype=torch.int64)
    cm[0, 0], cm[0, 13], cm[13, 13] = 3, 1, 4
    headers, rows = metrics_table(metrics_from_confusion(cm, 1))
    assert headers[0] == "class" and [r[0] for r in rows] == list(CITYSCAPES_CLASSES)
    assert rows[0][1:] == ["75.00", "75.00", "50.00"] and rows[13][1] == "80.00"
    assert rows[1][1:] == ["-", "-", "0.00"]  # sidewalk: neither labelled nor predicted
    _, rows = metrics_table(metrics_from_confusion(torch.eye(3, dtype=torch.int64), 1))
    assert [r[0] for r in rows] == ["0", "1", "2"]


def test_png_label_maps_with_pillow(tmp_path):
    """Real 8-bit PNG label maps (as Cityscapes ships them) are read through Pillow."""
    Image = pytest.importorskip("PIL.Image")
    from hrnet_fast.imageio import read_label
    lab = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(lab, mode="L").save(tmp_path / "x_gtFine_labelIds.png")
    assert np.array_equal(read_label(tmp_path / "x_gtFine_labelIds.png"), lab)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageReadError, match="one channel of class ids"):
        read_label(tmp_path / "rgb.png")
