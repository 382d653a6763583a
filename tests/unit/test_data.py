import json

import pytest

from senseflow.data.prompts import PromptStream, load_prompts
from senseflow.teachers.base import SenseflowError


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.json").write_text(json.dumps({"prompts": ["x", "y"]}))
    (tmp_path / "q.json").write_text(json.dumps(["z"]))
    (tmp_path / "p.csv").write_text("id,prompt\n1,hello\n2,world\n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.json") == ["x", "y"]
    assert load_prompts(tmp_path / "q.json") == ["z"]
    assert load_prompts(tmp_path / "p.csv") == ["hello", "world"]


@pytest.mark.parametrize("name,content,needle", [
    ("e.txt", "\n\n", "no prompts"), ("b.json", "{not json", "cannot be parsed"),
    ("c.json", json.dumps({"captions": []}), "JSON list"), ("d.csv", "id,text\n1,a\n", "no column"),
])
def test_bad_prompt_files(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(SenseflowError, match=needle):
        load_prompts(tmp_path / name)
    with pytest.raises(SenseflowError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


def test_rank_shards_are_disjoint_and_cover_the_set():
    prompts = [f"p{i}" for i in range(12)]
    seen = [PromptStream(prompts, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    a = seen[0].next_prompts() + seen[0].next_prompts()
    b = seen[1].next_prompts() + seen[1].next_prompts()
    assert not set(a) & set(b) and set(a) | set(b) == set(prompts)


def test_stream_resumes_mid_epoch_and_reshuffles_per_epoch():
    prompts = [f"p{i}" for i in range(10)]
    s = PromptStream(prompts, 4, seed=3)
    first = [s.next_prompts() for _ in range(2)]
    state = s.state_dict()
    rest = [s.next_prompts() for _ in range(4)]
    r = PromptStream(prompts, 4, seed=3)
    r.load_state_dict(state)
    assert [r.next_prompts() for _ in range(4)] == rest
    epoch0 = first[0] + first[1] + rest[0][:2]
    assert sorted(epoch0) == sorted(prompts)
