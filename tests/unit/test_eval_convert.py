"""Weight converters: a synthetic official-layout state dict maps key by key, and the converted model
computes what the official architecture computes; incomplete or pickled files are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from senseflow.cli import main
from tests.helpers.tiny_models import make_clip_tokenizer

# ------------------------------------------------------------------ open_clip (HPSv2) reference

W_V, W_T, EMBED, PATCH, GRID, VOCAB, CTX = 64, 64, 16, 8, 2, 40, 77


class _Block(nn.Module):
    """open_clip ``ResidualAttentionBlock``: ln_1, attn (nn.MultiheadAttention), ln_2, mlp.c_fc / c_proj."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})
        self.heads = heads

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp["c_proj"](F.gelu(self.mlp["c_fc"](self.ln_2(x))))


class _Tower(nn.Module):
    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))


class OpenCLIPLike(nn.Module):
    """Parameter names and forward of open_clip's ``CLIP`` (ViT image tower, causal text tower)."""

    def __init__(self, w_v=W_V, w_t=W_T, layers_v=2, layers_t=2, heads_v=4, embed=EMBED, patch=PATCH, grid=GRID,
                 vocab=VOCAB) -> None:
        super().__init__()
        visual = nn.Module()
        visual.conv1 = nn.Conv2d(3, w_v, patch, patch, bias=False)
        visual.class_embedding = nn.Parameter(torch.randn(w_v) * 0.1)
        visual.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w_v) * 0.1)
        visual.ln_pre, visual.ln_post = nn.LayerNorm(w_v), nn.LayerNorm(w_v)
        visual.transformer = _Tower(w_v, heads_v, layers_v)  # tiny: VISION_HEADS gets W_V -> 4 in the fixture
        visual.proj = nn.Parameter(torch.randn(w_v, embed) * 0.1)
        self.visual = visual
        self.token_embedding = nn.Embedding(vocab, w_t)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, w_t) * 0.1)
        self.transformer = _Tower(w_t, w_t // 64, layers_t)  # 64-wide heads as open_clip's text configs
        self.ln_final = nn.LayerNorm(w_t)
        self.text_projection = nn.Parameter(torch.randn(w_t, embed) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("attn_mask", torch.full((CTX, CTX), float("-inf")).triu(1))

    def encode_image(self, px):
        v = self.visual
        x = v.conv1(px).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for blk in v.transformer.resblocks:
            x = blk(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        for blk in self.transformer.resblocks:
            x = blk(x, self.attn_mask)
        x = self.ln_final(x)
        return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection  # EOT = highest id


@pytest.fixture()
def hps_checkpoint(tmp_path, monkeypatch):
    from senseflow.evaluation.convert import hps

    monkeypatch.setitem(hps.VISION_HEADS, W_V, 4)  # a tiny width with 4 heads, like the test model
    torch.manual_seed(0)
    ref = OpenCLIPLike().eval()
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    tok = tmp_path / "clip_h_tokenizer"
    make_clip_tokenizer().save_pretrained(str(tok))
    return ref, path, tok


def test_hps_converter_maps_every_key_and_matches_open_clip(hps_checkpoint, tmp_path):
    from transformers import CLIPModel

    from senseflow.evaluation.convert.hps import clip_config, map_open_clip

    ref, path, tok = hps_checkpoint
    mapped, unused = map_open_clip(ref.state_dict())
    assert unused == []
    hf_keys = {k for k in CLIPModel(clip_config(ref.state_dict())).state_dict() if not k.endswith("position_ids")}
    assert set(mapped) == hf_keys
    out = tmp_path / "hps_hf"
    assert main(["convert-weights", "hps", str(path), str(out), "--tokenizer", str(tok)]) == 0
    model = CLIPModel.from_pretrained(str(out)).eval()
    assert (out / "tokenizer.json").is_file() and json.loads((out / "senseflow_convert.json").read_text())["kind"] == "hps"
    px = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    ids = torch.randint(1, VOCAB - 2, (2, CTX))
    ids[0, 5], ids[1, 9] = VOCAB - 1, VOCAB - 1  # the EOT token (highest id) ends each prompt
    from senseflow.evaluation.metrics.clip_common import projected

    with torch.no_grad():
        torch.testing.assert_close(projected(model.get_image_features(pixel_values=px)), ref.encode_image(px),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(projected(model.get_text_features(input_ids=ids)), ref.encode_text(ids),
                                   rtol=1e-4, atol=1e-5)
        assert float(model.logit_scale) == pytest.approx(4.6052)


def test_hps_config_for_the_real_vit_h_14_layout():
    """open_clip ViT-H-14 (HPSv2): vision 1280 x 32 layers, 16 heads, patch 14 at 224; text 1024 x 24; embed 1024."""
    from transformers import CLIPModel

    from senseflow.evaluation.convert.hps import clip_config, map_open_clip

    with torch.device("meta"):
        state = OpenCLIPLike(w_v=1280, w_t=1024, layers_v=32, layers_t=24, heads_v=16, embed=1024, patch=14,
                             grid=16, vocab=49408).state_dict()
        config = clip_config(state)
        expected = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()
                    if not k.endswith("position_ids")}
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size) == (1280, 32, 16, 5120, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size, t.eos_token_id) == (
        1024, 24, 16, 49408, 49407)
    mapped, unused = map_open_clip(state)
    assert unused == [] and {k: tuple(x.shape) for k, x in mapped.items()} == expected


def test_hps_converter_refuses_incomplete_or_pickled_files_and_writes_nothing(hps_checkpoint, tmp_path, capsys):
    ref, path, tok = hps_checkpoint
    state = ref.state_dict()
    del state["transformer.resblocks.1.attn.in_proj_weight"]
    state["visual.extra_head.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pt")
    out = tmp_path / "out"
    assert main(["convert-weights", "hps", str(tmp_path / "broken.pt"), str(out), "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err.strip()
    assert "3 weights missing" in err and "not understood (e.g. visual.extra_head.weight)" in err
    assert len(err.splitlines()) == 1 and not out.exists()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    assert main(["convert-weights", "hps", str(tmp_path / "evil.pt"), str(out), "--tokenizer", str(tok)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickled code" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["convert-weights", "hps", str(path), str(out), "--tokenizer", str(tmp_path / "no_tok")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert-weights", "hps", str(path), str(out), "--tokenizer", str(tok)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()


# ------------------------------------------------------------------ ImageReward (BLIP) reference

VW, TW, DEPTH, IMG, P16 = 64, 64, 2, 32, 16
WORDS = ["a", "red", "cat", "dog", "photo", "of", "blue", "the"]


def official_image_reward_state(seed: int = 0, VW=VW, TW=TW, DEPTH=DEPTH, IMG=IMG, P16=P16, vocab=None,
                                positions=40, meta=False) -> dict[str, torch.Tensor]:
    """Key names and shapes of ImageReward.ImageReward's state dict (BLIP ViT, BLIP med BERT, MLP)."""
    gen = torch.Generator().manual_seed(seed)
    r = ((lambda *shape: torch.empty(*shape, device="meta")) if meta  # noqa: E731
         else (lambda *shape: torch.randn(*shape, generator=gen) * 0.05))
    vocab = vocab or 5 + len(WORDS) + 2
    s = {"blip.visual_encoder.cls_token": r(1, 1, VW), "blip.visual_encoder.pos_embed": r(1, (IMG // P16) ** 2 + 1, VW),
         "blip.visual_encoder.patch_embed.proj.weight": r(VW, 3, P16, P16),
         "blip.visual_encoder.patch_embed.proj.bias": r(VW),
         "blip.visual_encoder.norm.weight": 1 + r(VW), "blip.visual_encoder.norm.bias": r(VW)}
    for i in range(DEPTH):
        b = f"blip.visual_encoder.blocks.{i}."
        for n in ("norm1", "norm2"):
            s[b + n + ".weight"], s[b + n + ".bias"] = 1 + r(VW), r(VW)
        for n, (o, inp) in {"attn.qkv": (3 * VW, VW), "attn.proj": (VW, VW), "mlp.fc1": (4 * VW, VW),
                            "mlp.fc2": (VW, 4 * VW)}.items():
            s[b + n + ".weight"], s[b + n + ".bias"] = r(o, inp), r(o)
    t = "blip.text_encoder."
    s[t + "embeddings.word_embeddings.weight"] = r(vocab, TW)
    s[t + "embeddings.position_embeddings.weight"] = r(positions, TW)
    s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"] = 1 + r(TW), r(TW)
    s[t + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    text_depth = DEPTH if not meta else 12
    for j in range(text_depth):
        b = f"{t}encoder.layer.{j}."
        linears = {"attention.self.query": (TW, TW), "attention.self.key": (TW, TW),
                   "attention.self.value": (TW, TW), "attention.output.dense": (TW, TW),
                   "crossattention.self.query": (TW, TW), "crossattention.self.key": (TW, VW),
                   "crossattention.self.value": (TW, VW), "crossattention.output.dense": (TW, TW),
                   "intermediate.dense": (4 * TW, TW), "output.dense": (TW, 4 * TW)}
        for n, (o, inp) in linears.items():
            s[b + n + ".weight"], s[b + n + ".bias"] = r(o, inp), r(o)
        for n in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            s[b + n + ".weight"], s[b + n + ".bias"] = 1 + r(TW), r(TW)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = r(256, VW), r(256)
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = r(256, TW), r(256)
    dims = [TW, 1024, 128, 64, 16, 1]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        s[f"mlp.layers.{idx}.weight"], s[f"mlp.layers.{idx}.bias"] = r(o, i) * 4, r(o)
    return s


def blip_vit_reference(state, px):
    """BLIP's VisionTransformer forward (timm layout): patch conv, [CLS] + pos, pre-norm blocks, final norm."""
    g = lambda k: state["blip.visual_encoder." + k]  # noqa: E731
    x = F.conv2d(px, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=P16).flatten(2).transpose(1, 2)
    x = torch.cat([g("cls_token").expand(x.shape[0], -1, -1), x], 1) + g("pos_embed")
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (VW,), g(b + "norm1.weight"), g(b + "norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, g(b + "attn.qkv.weight"), g(b + "attn.qkv.bias")).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / VW ** 0.5, dim=-1) @ v  # one 64-wide head
        x = x + F.linear(a, g(b + "attn.proj.weight"), g(b + "attn.proj.bias"))
        h = F.layer_norm(x, (VW,), g(b + "norm2.weight"), g(b + "norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, g(b + "mlp.fc1.weight"), g(b + "mlp.fc1.bias"))),
                         g(b + "mlp.fc2.weight"), g(b + "mlp.fc2.bias"))
    return F.layer_norm(x, (VW,), g("norm.weight"), g("norm.bias"), eps=1e-6)


@pytest.fixture()
def image_reward_files(tmp_path):
    state = official_image_reward_state()
    path = tmp_path / "ImageReward.pt"
    torch.save(state, path)
    bert = tmp_path / "bert-base-uncased"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return state, path, bert


def test_image_reward_converter_maps_every_key_and_matches_blip(image_reward_files, tmp_path):
    from transformers import BlipForImageTextRetrieval

    from senseflow.evaluation.convert.image_reward import REWARD_MEAN, REWARD_STD
    from senseflow.evaluation.metrics.registry import build_metric

    state, path, bert = image_reward_files
    out = tmp_path / "image_reward_hf"
    assert main(["convert-weights", "image-reward", str(path), str(out), "--tokenizer", str(bert)]) == 0
    model = BlipForImageTextRetrieval.from_pretrained(str(out)).eval()
    loaded = model.state_dict()
    assert torch.equal(loaded["text_encoder.encoder.layer.1.crossattention.self.key.weight"],
                       state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(loaded["itm_head.weight"], torch.zeros_like(loaded["itm_head.weight"]))
    px = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_model(pixel_values=px).last_hidden_state,
                                   blip_vit_reference(state, px), rtol=1e-4, atol=1e-4)
    # the released normalisation constants of ImageReward.py
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)

    metric = build_metric("image_reward", str(out), device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, IMG, IMG), generator=gen, dtype=torch.uint8)
    prompts = ["a red cat", "a photo of the blue dog"]
    metric.update(images, prompts)
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(out))
    ids = tok(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    assert ids.input_ids.shape == (2, 35) and int(ids.input_ids[0, 0]) == tok.cls_token_id
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = blip_vit_reference(state, (images.float() / 255 - mean) / std)
        cls = model.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask, encoder_hidden_states=img,
                                 encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        x = cls
        for idx in (0, 2, 4, 6, 7):
            x = F.linear(x, state[f"mlp.layers.{idx}.weight"], state[f"mlp.layers.{idx}.bias"])
    expected = (x[:, 0] - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(metric.scores().float(), expected, rtol=1e-4, atol=1e-4)
    assert {p.name for p in metric.weight_files()} >= {"model.safetensors", "mlp.safetensors", "image_reward.json"}


def test_image_reward_config_for_the_real_blip_large_layout():
    """ImageReward: BLIP ViT-L/16 at 224 (1024 x 24 layers, 16 heads), BERT-base (768 x 12) + [DEC]/[ENC] = 30524."""
    from transformers import BlipForImageTextRetrieval

    from senseflow.evaluation.convert.image_reward import blip_config, map_image_reward

    state = official_image_reward_state(VW=1024, TW=768, DEPTH=24, IMG=224, P16=16, vocab=30524, positions=512,
                                        meta=True)
    config = blip_config(state)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.layer_norm_eps) == (
        1024, 24, 16, 224, 1e-6)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.encoder_hidden_size, t.vocab_size,
            t.bos_token_id) == (768, 12, 12, 1024, 30524, 30522)
    with torch.device("meta"):
        expected = {k: tuple(x.shape) for k, x in BlipForImageTextRetrieval(config).state_dict().items()
                    if not k.endswith("position_ids") and not k.startswith("itm_head.")}
    blip, mlp, unused = map_image_reward(state)
    assert unused == [] and {k: tuple(x.shape) for k, x in blip.items()} == expected and len(mlp) == 10


def test_image_reward_converter_refuses_incomplete_checkpoints(image_reward_files, tmp_path, capsys):
    state, path, bert = image_reward_files
    broken = dict(state)
    del broken["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    out = tmp_path / "out"
    assert main(["convert-weights", "image-reward", str(tmp_path / "broken.pt"), str(out), "--tokenizer",
                 str(bert)]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 weights missing (e.g. vision_model.encoder.layers.1.self_attn.qkv.weight)" in err
    assert len(err.splitlines()) == 1 and not out.exists()
    no_head = {k: v for k, v in state.items() if not k.startswith("mlp.layers.7")}
    torch.save(no_head, tmp_path / "no_head.pt")
    assert main(["convert-weights", "image-reward", str(tmp_path / "no_head.pt"), str(out), "--tokenizer",
                 str(bert)]) == 2
    assert "reward head mlp.layers.7.weight" in capsys.readouterr().err and not out.exists()
    assert main(["convert-weights", "image-reward", str(path), str(out), "--tokenizer", str(tmp_path)]) == 2
    assert "vocab.txt" in capsys.readouterr().err and not out.exists()
