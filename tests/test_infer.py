"""segment_files and its inputs: files, folders and globs; outputs equal to the argmax of the TTA
logits of each image on its own; batching by size; resume; corrupt images; progress without tqdm."""
import os
import sys

import numpy as np
import pytest
import torch

from hrnet_fast import infer
from hrnet_fast.imageio import palette, read_rgb
from hrnet_fast.infer import (EXIT_SKIPPED, InputError, Item, collate_by_size, expand_inputs,
                              segment_files)
from hrnet_fast.tta import TTA
from test_cli import _read_png
from test_evaluate import predictions_one_by_one, write_ppm
from test_tta import PoolNet


def _image(seed, h, w):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture
def frames(tmp_path):
    """frames/a.ppm, frames/b.ppm (another size), frames/sub/c.ppm, frames/notes.txt."""
    for k, (name, h, w) in enumerate([("a", 20, 28), ("b", 24, 16), ("sub/c", 20, 28)]):
        write_ppm(tmp_path / "frames" / f"{name}.ppm", _image(k, h, w))
    (tmp_path / "frames" / "notes.txt").write_text("not an image")
    return tmp_path / "frames"


def test_inputs_files_folders_and_globs(frames, tmp_path):
    f = str(frames)
    assert [(os.path.relpath(i.path, f), i.name) for i in expand_inputs([f])] == [
        ("a.ppm", "a"), ("b.ppm", "b"), (os.path.join("sub", "c.ppm"), os.path.join("sub", "c"))]
    assert [i.name for i in expand_inputs([os.path.join(f, "*", "*.ppm")])] == [os.path.join("sub", "c")]
    assert [i.name for i in expand_inputs([os.path.join(f, "**", "*.ppm")])] == [
        "a", "b", os.path.join("sub", "c")]
    # a file given twice (directly and through its folder) counts once
    assert [i.name for i in expand_inputs([os.path.join(f, "a.ppm"), f])] == [
        "a", "b", os.path.join("sub", "c")]
    write_ppm(tmp_path / "other" / "a.ppm", _image(5, 4, 4))
    with pytest.raises(InputError, match="would both be written as a.png"):
        expand_inputs([os.path.join(f, "a.ppm"), str(tmp_path / "other" / "a.ppm")])
    with pytest.raises(InputError, match="image not found: .*nope.ppm"):
        expand_inputs([str(tmp_path / "nope.ppm")])
    with pytest.raises(InputError, match="no image matches .*\\*.jpg"):
        expand_inputs([os.path.join(f, "*.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in directory .*empty"):
        expand_inputs([str(tmp_path / "empty")])


def test_earlier_outputs_inside_an_input_folder_are_not_inputs(frames):
    out = frames / "seg"
    first = segment_files([str(frames)], str(out), PoolNet(), progress=False)
    second = segment_files([str(frames)], str(out), PoolNet(), progress=False)
    assert sorted(first.written) == sorted(second.written) == ["a", "b", os.path.join("sub", "c")]


def test_outputs_may_not_overwrite_inputs(frames):
    write_ppm(frames / "a_colour.png", _image(9, 4, 4))  # an input named like a colour output
    with pytest.raises(InputError, match="would overwrite the input image"):
        segment_files([str(frames)], str(frames), PoolNet(), colour=True, progress=False)


def test_collate_groups_images_by_size_and_keeps_failures():
    def sample(i, h, w, error=None):
        return {"index": i, "image": None if error else torch.full((h, w, 3), i, dtype=torch.uint8),
                "label": None, "error": error, "decode_s": 0.5}
    batch = collate_by_size([sample(0, 4, 6), sample(1, 4, 7), sample(2, 4, 6, "bad"), sample(3, 4, 6)])
    assert [g["indices"] for g in batch["groups"]] == [[0, 3], [1]]
    assert batch["groups"][0]["images"].shape == (2, 4, 6, 3)
    assert batch["groups"][0]["images"][1].unique().tolist() == [3]
    assert batch["failed"] == [(2, "bad")] and batch["decode_s"] == 2.0


@pytest.mark.parametrize("batch, workers, tta", [
    (1, 0, TTA()),
    (3, 1, TTA(scales=(1.0, 1.5), flip=True)),
])
def test_segment_files_writes_the_argmax_of_each_image(frames, tmp_path, batch, workers, tta):
    model = PoolNet(num_classes=5)
    out = tmp_path / "out"
    result = segment_files([str(frames)], str(out), model, tta=tta, batch_size=batch, workers=workers,
                           colour=True, overlay=True, progress=False)
    items = expand_inputs([str(frames)])
    assert sorted(result.written) == sorted(i.name for i in items) and not result.skipped
    assert result.exit_status == 0 and result.timings.images == 3
    want = predictions_one_by_one(model, items, tta)
    colours = palette(5)
    for item, labels in zip(items, want):
        got = _read_png(out / f"{item.name}.png")
        assert np.array_equal(got, labels)
        assert np.array_equal(_read_png(out / f"{item.name}_colour.png"), colours[labels])
        blend = (0.5 * colours[labels] + 0.5 * read_rgb(item.path)).astype(np.uint8)
        assert np.array_equal(_read_png(out / f"{item.name}_overlay.png"), blend)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_batches_go_through_the_model_by_size(frames, tmp_path):
    model = PoolNet()
    segment_files([str(frames)], str(tmp_path / "out"), model, batch_size=3, progress=False)
    # a (20x28), b (24x16), c (20x28) in one loader batch: a and c together, b alone
    assert sorted(model.calls) == [(1, 3, 24, 16), (2, 3, 20, 28)]


def test_resume_skips_finished_images(frames, tmp_path):
    out = tmp_path / "out"
    segment_files([str(frames / "a.ppm")], str(out), PoolNet(), colour=True, progress=False)
    model = PoolNet()
    result = segment_files([str(frames)], str(out), model, colour=True, resume=True, progress=False)
    assert result.existing == ["a"] and sorted(result.written) == ["b", os.path.join("sub", "c")]
    assert len(model.calls) == 2
    os.remove(out / "b_colour.png")  # an image with a missing output is done again
    model = PoolNet()
    result = segment_files([str(frames)], str(out), model, colour=True, resume=True, progress=False)
    assert result.written == ["b"] and len(model.calls) == 1
    assert (out / "b_colour.png").exists()


def test_a_corrupt_image_is_named_and_skipped(frames, tmp_path):
    (frames / "broken.ppm").write_bytes(b"P6\n10 10\n255\n" + bytes(7))
    result = segment_files([str(frames)], str(tmp_path / "out"), PoolNet(), batch_size=2, workers=1,
                           progress=False)
    assert sorted(result.written) == ["a", "b", os.path.join("sub", "c")]
    assert len(result.skipped) == 1
    path, reason = result.skipped[0]
    assert path.endswith("broken.ppm") and "broken.ppm" in reason and "truncated" in reason
    assert result.exit_status == EXIT_SKIPPED == 3
    assert not (tmp_path / "out" / "broken.png").exists()


def test_a_failing_write_stops_the_run_with_its_error(frames, tmp_path, monkeypatch):
    def full_disk(path, image):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(infer, "write_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        segment_files([str(frames)], str(tmp_path / "out"), PoolNet(), progress=False)


def test_progress_without_tqdm_prints_plain_lines(frames, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    segment_files([str(frames)], str(tmp_path / "out"), PoolNet(), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["segment: 1/3 images", "segment: 2/3 images", "segment: 3/3 images"]


def test_progress_uses_tqdm_when_installed(frames, tmp_path, capsys):
    pytest.importorskip("tqdm")
    segment_files([str(frames)], str(tmp_path / "out"), PoolNet(), progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "segment: 1/3 images" not in err


def test_too_many_classes_for_8_bit_pngs(frames, tmp_path):
    with pytest.raises(InputError, match="at most 256 classes"):
        segment_files([str(frames)], str(tmp_path / "out"), PoolNet(num_classes=300), progress=False)


def test_items_can_be_given_directly(frames, tmp_path):
    items = [Item(str(frames / "a.ppm"), "x/renamed")]
    result = segment_files(items, str(tmp_path / "out"), PoolNet(), progress=False)
    assert result.written == ["x/renamed"] and (tmp_path / "out" / "x" / "renamed.png").exists()
