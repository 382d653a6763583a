"""CLIP score, PickScore and HPS against a cosine computed by hand from the model's own towers."""

from __future__ import annotations

import pytest
import torch

from senseflow.evaluation.metrics.base import MetricWeightsError
from senseflow.evaluation.metrics.registry import build_metric
from tests.helpers.eval_models import make_tiny_clip_folder

CPU = torch.device("cpu")
PROMPTS = ["a red cat", "a photo of a blue dog", "the big green square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip", logit_scale=2.0)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def _hand_cosine(folder, images, prompts, mean, std, prefix=""):
    """Vision tower CLS -> visual_projection; text tower EOS -> text_projection; cosine (CLIP, Radford et al.)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tok = CLIPTokenizer.from_pretrained(str(folder))
    px = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        v = model.vision_model(pixel_values=px).last_hidden_state[:, 0]
        img = model.visual_projection(model.vision_model.post_layernorm(v))
        ids = tok([prefix + p for p in prompts], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        hidden = model.text_model(input_ids=ids).last_hidden_state
        eos = (ids == tok.eos_token_id).int().argmax(dim=-1)  # the first EOS token pools the prompt
        txt = model.text_projection(hidden[torch.arange(len(prompts)), eos])
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1), float(model.logit_scale.detach().exp())


def test_clip_score_is_the_raw_cosine(clip_dir):
    images = _images(3, 32)  # already at the model's 32 px: resize and crop are identities
    metric = build_metric("clip_score", str(clip_dir), device=CPU, batch_size=2)
    metric.update(images, PROMPTS)
    expected, _ = _hand_cosine(clip_dir, images, PROMPTS, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    torch.testing.assert_close(metric.scores().float(), expected, rtol=1e-4, atol=1e-5)
    assert metric.compute()["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert {p.name for p in metric.weight_files()} >= {"model.safetensors", "config.json", "tokenizer.json"}


def test_clip_score_prefix_is_prepended_to_every_prompt(clip_dir):
    images = _images(3, 32, seed=1)
    metric = build_metric("clip_score", str(clip_dir), device=CPU, prefix="a photo of ")
    metric.update(images, PROMPTS)
    expected, _ = _hand_cosine(clip_dir, images, PROMPTS, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], prefix="a photo of ")
    torch.testing.assert_close(metric.scores().float(), expected, rtol=1e-4, atol=1e-5)


def test_pickscore_is_logit_scale_times_cosine_and_hps_is_the_cosine(clip_dir):
    images = _images(3, 32, seed=2)
    expected, scale = _hand_cosine(clip_dir, images, PROMPTS, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert scale == pytest.approx(torch.tensor(2.0).exp().item())
    pick = build_metric("pickscore", str(clip_dir), device=CPU)
    pick.update(images, PROMPTS)
    torch.testing.assert_close(pick.scores().float(), scale * expected, rtol=1e-4, atol=1e-4)
    hps = build_metric("hps", str(clip_dir), device=CPU)
    hps.update(images, PROMPTS)
    assert hps.compute()["hps"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_larger_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path):
    folder = make_tiny_clip_folder(tmp_path / "clip", preprocessor=False)  # OpenAI mean/std, model size 32
    # 64x128 -> short side 32 -> 32x64 -> centre 32x32 = columns 16..48 of the resized image, i.e. 32..96
    # of the original; the flat band 16..112 covers them with margin for the bicubic support
    images = torch.zeros(1, 3, 64, 128, dtype=torch.uint8)
    images[..., :, 16:112] = 200
    metric = build_metric("clip_score", str(folder), device=CPU)
    metric.update(images, PROMPTS[:1])
    flat = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    expected, _ = _hand_cosine(folder, flat, PROMPTS[:1], [0.48145466, 0.4578275, 0.40821073],
                               [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(metric.scores().float(), expected, rtol=1e-3, atol=1e-4)


def test_missing_or_wrong_clip_folders_are_one_line(tmp_path, clip_dir):
    import shutil

    cases = {"does not exist": tmp_path / "nope", "no weights given": None}
    no_tok = tmp_path / "no_tok"
    shutil.copytree(clip_dir, no_tok)
    for f in ("tokenizer.json", "vocab.json"):
        (no_tok / f).unlink(missing_ok=True)
    cases["lacks tokenizer.json"] = no_tok
    wrong = tmp_path / "wrong"
    shutil.copytree(clip_dir, wrong)
    (wrong / "config.json").write_text('{"model_type": "blip"}')
    cases["model_type 'blip'"] = wrong
    for message, folder in cases.items():
        for name in ("clip_score", "pickscore", "hps"):
            with pytest.raises(MetricWeightsError, match=message) as err:
                build_metric(name, None if folder is None else str(folder), device=CPU)
            assert "\n" not in str(err.value) and "huggingface.co" in str(err.value)


def test_preprocessing_equals_transformers_pil_clip_processor(clip_dir, tmp_path):
    """Independent check of resize + crop + normalise: transformers' PIL CLIP processor on the same images."""
    import json

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from PIL import Image

    folder = tmp_path / "clip224"
    import shutil

    shutil.copytree(clip_dir, folder)
    cfg = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    from senseflow.evaluation.metrics.clip_common import CLIPEmbedder

    emb = CLIPEmbedder(folder, what="t", source="t", device=CPU)
    images = _images(2, 512, seed=5)[..., :384, :]  # 384x512 -> 224x298 -> centre 224 (even margins)
    ours = emb.pixels(images)
    proc = CLIPImageProcessorPil(**cfg)
    theirs = proc(images=[Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images],
                  return_tensors="pt").pixel_values
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
