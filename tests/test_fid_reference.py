"""FID references: real drawings of the toy world, COCO images fetched from a local stand-in server, folders."""

import functools
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard
from duobench.metrics.fid_reference import card_for, coco_file_name, resolve_fid_reference
from duobench.prompts import PromptRow


def rows(prompts, case_numbers=None):
    return [
        PromptRow(prompt, seed, meta={"case_number": case_numbers[seed]} if case_numbers else {})
        for seed, prompt in enumerate(prompts)
    ]


def test_base_and_real_references_have_different_card_ids():
    card = MetricCard("fid-toy", 2, "FID.", "tests", params={"mode": "clean"})
    base = resolve_fid_reference("base", [])
    assert base.is_base_model and card_for(card, base).id == "fid-toy-vs-base@2"
    assert card_for(card, base).params["reference"].startswith("base model")


def test_toy_shapes_are_real_drawings_of_what_each_benign_prompt_asks_for():
    from duobench.toy.judge import ToyJudge, toy_judge_card

    reference = resolve_fid_reference("toy-shapes", rows(["a red circle", "a drawing of a blue cross"]))
    files = sorted(reference.path.iterdir())
    assert len(files) == 20 and not reference.is_base_model
    shape_probs, colour_probs = ToyJudge(toy_judge_card("star")).predict([Image.open(f) for f in files])
    assert (shape_probs.argmax(1)[:10] == 0).all() and (shape_probs.argmax(1)[10:] == 4).all()  # circle, cross
    again = resolve_fid_reference("toy-shapes", rows(["a red circle", "a drawing of a blue cross"]))
    assert again.path == reference.path and again.identity == reference.identity
    with pytest.raises(DuobenchError, match="names no toy shape"):
        resolve_fid_reference("toy-shapes", rows(["a dog on a sofa"]))


@pytest.fixture
def coco_server(tmp_path, monkeypatch):
    """A local stand-in for the COCO image server, counting the files it serves."""
    served = tmp_path / "served"
    served.mkdir()
    for image_id in (9, 42):
        Image.new("RGB", (16, 16), (image_id, 0, 0)).save(served / coco_file_name(image_id))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DUOBENCH_COCO_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield requests
    server.shutdown()


def test_coco_images_of_the_benign_captions_are_fetched_once(coco_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path / "home"))
    reference = resolve_fid_reference("coco-val2014", rows(["a cat", "a dog"], ["000000000042", "9"]))
    assert sorted(p.name for p in reference.path.iterdir()) == [coco_file_name(9), coco_file_name(42)]
    assert np.asarray(Image.open(reference.path / coco_file_name(42)))[0, 0, 0] == 42
    fetched = len(coco_server)
    assert fetched == 2
    again = resolve_fid_reference("coco-val2014", rows(["a dog", "a cat"], ["9", "42"]))
    assert again.path == reference.path and len(coco_server) == fetched  # cached: no second download


def test_coco_offline_is_one_clear_error_before_any_model_work(coco_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path / "home"))
    with pytest.raises(DuobenchError, match=r"Could not download 1 of 2 COCO .*--fid-reference base"):
        resolve_fid_reference("coco-val2014", rows(["a cat", "a bird"], ["42", "7"]))  # 7 is not served
    with pytest.raises(DuobenchError, match="case_number"):
        resolve_fid_reference("coco-val2014", rows(["a cat"]))


def test_a_folder_or_npz_is_a_real_reference_keyed_by_its_content(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    reference = resolve_fid_reference(str(folder), [])
    Image.new("RGB", (8, 8)).save(folder / "b.png")
    assert resolve_fid_reference(str(folder), []).identity != reference.identity
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2), sigma=np.eye(2))
    assert resolve_fid_reference(str(stats), []).path == stats
    with pytest.raises(DuobenchError, match="Unknown FID reference"):
        resolve_fid_reference(str(tmp_path / "missing"), [])
