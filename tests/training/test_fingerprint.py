import fsspec

from training.fingerprint import file_digest, fingerprint, model_identity


def _fp(**kw):
    base = dict(asset="a", code_version="1", config={"x": 1, "y": [1, 2]}, upstream={"u": "f1"}, target="t")
    return fingerprint(**{**base, **kw})


def test_stable_and_order_independent():
    assert _fp() == _fp(config={"y": [1, 2], "x": 1}) == _fp(upstream={"u": "f1"})
    assert len(_fp()) == 24


def test_every_input_changes_it():
    base = _fp()
    for change in [
        dict(asset="b"), dict(code_version="2"), dict(config={"x": 2, "y": [1, 2]}),
        dict(upstream={"u": "f2"}), dict(upstream={"u": "f1", "v": "f3"}), dict(target="t2"),
    ]:
        assert _fp(**change) != base, change


def test_file_digest_is_content_based(tmp_path):
    fs = fsspec.filesystem("file")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("same")
    b.write_text("same")
    assert file_digest(fs, str(a)) == file_digest(fs, str(b))
    b.write_text("other")
    assert file_digest(fs, str(a)) != file_digest(fs, str(b))


def test_model_identity_follows_directory_content(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (9 << 20))
    first = model_identity(str(tmp_path))
    assert first == model_identity(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert model_identity(str(tmp_path)) != first
    second = model_identity(str(tmp_path))
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek((9 << 20) - 10)
        f.write(b"\1")  # a change in the last MiB of the weights
    assert model_identity(str(tmp_path)) != second
    assert model_identity("org/model", "abc123") == "org/model@abc123"
