"""Weight converters: a synthetic official-layout state dict maps key by key, and the converted model
computes what the official architecture computes; incomplete or pickled files are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from senseflow.cli import main
from senseflow.teachers.base import SenseflowError
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

    def __init__(self) -> None:
        super().__init__()
        visual = nn.Module()
        visual.conv1 = nn.Conv2d(3, W_V, PATCH, PATCH, bias=False)
        visual.class_embedding = nn.Parameter(torch.randn(W_V) * 0.1)
        visual.positional_embedding = nn.Parameter(torch.randn(GRID * GRID + 1, W_V) * 0.1)
        visual.ln_pre, visual.ln_post = nn.LayerNorm(W_V), nn.LayerNorm(W_V)
        visual.transformer = _Tower(W_V, 4, 2)  # VISION_HEADS has no 64: overridden below for the test
        visual.proj = nn.Parameter(torch.randn(W_V, EMBED) * 0.1)
        self.visual = visual
        self.token_embedding = nn.Embedding(VOCAB, W_T)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, W_T) * 0.1)
        self.transformer = _Tower(W_T, 1, 2)  # 64-wide heads as open_clip's text configs
        self.ln_final = nn.LayerNorm(W_T)
        self.text_projection = nn.Parameter(torch.randn(W_T, EMBED) * 0.1)
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
