"""Protocol pieces of senseflow evaluate: COCO captions and real images, presets, the teacher error curve xi(t)."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.evaluation import coco
from senseflow.evaluation.curve import unit_grid, xi_curve
from senseflow.evaluation.presets import PRESETS
from senseflow.schedules import RectifiedFlow


def synthetic_coco(tmp_path, n=6):
    """A COCO-format captions file (ids out of order, captions out of id order) and PNGs of several sizes."""
    folder = tmp_path / "val2017"
    folder.mkdir()
    images, anns = [], []
    for k, iid in enumerate([42, 7, 19, 3, 88, 51][:n]):
        name = f"{iid:012d}.png"
        Image.fromarray(np.full((20 + k, 30, 3), 10 * k, np.uint8)).save(folder / name)
        images.append({"id": iid, "file_name": name, "height": 20 + k, "width": 30})
        anns.append({"image_id": iid, "id": 1000 + iid, "caption": f"a red cat  number {iid}"})
        anns.append({"image_id": iid, "id": 10 + iid, "caption": f"a blue dog {iid}"})
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, folder


def test_coco_images_sorted_by_id_first_caption_by_annotation_id(tmp_path):
    ann, folder = synthetic_coco(tmp_path)
    images = coco.load_coco(ann, folder)
    assert [im.image_id for im in images] == [3, 7, 19, 42, 51, 88]
    assert coco.first_captions(images)[:2] == ["a blue dog 3", "a blue dog 7"]      # annotation id 13 < 1003
    assert images[0].captions[1] == "a red cat number 3"                            # whitespace normalised


def test_coco_selection_is_the_seeded_sample_in_id_order(tmp_path):
    ann, folder = synthetic_coco(tmp_path)
    images = coco.load_coco(ann, folder)
    picked = coco.select_images(images, 3, seed=0)
    want = sorted(random.Random(0).sample(range(6), 3))
    assert [im.image_id for im in picked] == [images[i].image_id for i in want]
    assert coco.select_images(images, None, 0) == images
    with pytest.raises(Exception, match="needs 10 images"):
        coco.select_images(images, 10, 0)


def test_real_image_centre_crop_and_resize(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[:, :, 0] = np.arange(6) * 40          # column index in the red channel
    Image.fromarray(arr).save(tmp_path / "x.png")
    crop = coco.load_real_image(tmp_path / "x.png", 4)        # 6x4 -> centre 4x4: columns 1..4
    assert crop.shape == (3, 4, 4) and crop.dtype == torch.uint8
    assert crop[0, 0].tolist() == [40, 80, 120, 160]
    small = coco.load_real_image(tmp_path / "x.png", 2)
    want = np.asarray(Image.fromarray(arr[:, 1:5]).resize((2, 2), Image.LANCZOS))
    assert torch.equal(small, torch.from_numpy(want.copy()).permute(2, 0, 1))


def tiny_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.helpers.tiny_models import make_clip_tokenizer
    tok = make_clip_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77,
                                      eos_token_id=tok.eos_token_id, bos_token_id=0, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(folder)
    return folder, model, proc


def test_best_clip_caption_is_the_argmax_cosine(tmp_path):
    ann, folder = synthetic_coco(tmp_path, n=3)
    images = coco.load_coco(ann, folder)
    clip, model, proc = tiny_clip_folder(tmp_path)
    chosen = coco.best_clip_captions(images, clip, torch.device("cpu"), batch_size=2, progress=False)
    for im, got in zip(images, chosen):     # by hand: one image at a time, cosine of projected embeddings
        with Image.open(im.path) as pil:
            pix = proc(images=[pil.convert("RGB")], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            v = model.get_image_features(pixel_values=pix).pooler_output[0]
            sims = []
            for cap in im.captions:
                t = proc(text=[cap], return_tensors="pt")
                e = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output[0]
                sims.append(float(torch.dot(v, e) / (v.norm() * e.norm())))
        assert got == im.captions[int(np.argmax(sims))]


def test_presets_name_the_papers_settings():
    sf = PRESETS["senseflow-coco5k"]
    assert (sf.coco_split, sf.num_images, sf.caption) == ("val2017", 5000, "best-clip")
    assert [m.name for m in sf.metrics] == ["fid_t", "clip_score", "hps", "pickscore", "image_reward"]
    assert "ViT-B/32" in sf.metrics[1].expects
    # SenseFlow Tab. 1 teacher NFE: SD 3.5 Large 100, SDXL 80 (steps x 2 with CFG), FLUX.1 dev 50 (embedded)
    assert 2 * sf.teacher["sd3"][0] == 100 and 2 * sf.teacher["sdxl"][0] == 80 and sf.teacher["flux"][0] == 50
    d = PRESETS["dmd2-coco10k"]
    assert (d.coco_split, d.num_images, d.real_size, d.real_resample, d.seed) == ("val2014", 10000, 512, "lanczos", 10)
    assert d.metrics[0].name == "fid" and d.metrics[1].options == {"prefix": "A photo depicts "}
    assert "ViT-g/14" in d.metrics[1].expects
    s = PRESETS["sid-coco10k"]
    assert (s.coco_split, s.num_images) == ("val2014", 10000)


# -- the teacher error curve ------------------------------------------------------------------------
def test_xi_curve_matches_hand_values():
    """xi = ||x0 - x0_hat||^2 / ||x0||^2: perfect denoiser 0, zero prediction 1, half of x0 -> 0.25."""
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    schedule = RectifiedFlow(shift=3.0)
    units = unit_grid(4)
    assert units == [0.125, 0.375, 0.625, 0.875]
    seeds = [1, 2, 3]
    assert xi_curve(x0, seeds, schedule, lambda x_t, t: x0, units)["xi"] == [0.0] * 4
    assert xi_curve(x0, seeds, schedule, lambda x_t, t: torch.zeros_like(x0), units)["xi"] == pytest.approx([1.0] * 4)
    assert xi_curve(x0, seeds, schedule, lambda x_t, t: 0.5 * x0, units)["xi"] == pytest.approx([0.25] * 4)
    c = xi_curve(x0, seeds, schedule, lambda x_t, t: x0, units)
    assert c["t"] == pytest.approx([3 * u / (1 + 2 * u) for u in units])     # SD3's static shift of the unit time


def test_xi_curve_of_the_identity_predictor_is_t_squared_times_a_constant():
    """x0_hat = x_t on a rectified flow: x0 - x_t = t (x0 - eps); with eps = x0 the error is 0, with eps = -x0
    it is (2t)^2 -- checked through a predictor that rebuilds x_t from the known x0."""
    x0 = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    schedule = RectifiedFlow(shift=1.0)
    units = unit_grid(3)
    # x_t = (1 - t) x0 + t eps  ->  predict (1 - t) x0 - t x0 (as if eps = -x0): error (2t)^2 ||x0||^2
    c = xi_curve(x0, [0, 1], schedule, lambda x_t, t: (1 - 2 * t.view(-1, 1, 1, 1)).float() * x0, units)
    assert c["xi"] == pytest.approx([(2 * u) ** 2 for u in units], rel=1e-6)
