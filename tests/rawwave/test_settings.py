from pathlib import Path

import pytest

from rawwave.settings import Settings, SettingsError, load_settings, settings_table


def test_defaults_work_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.chunk_samples == 3200
    assert settings.device == "cpu"
    assert settings.model_dir == Path("models/default")


def test_env_prefix_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAWWAVE_ICE_HOST_ADDRESSES", "127.0.0.1, ::1")
    monkeypatch.setenv("RAWWAVE_CHUNK_MS", "100")
    settings = load_settings()
    assert settings.ice_host_addresses == ["127.0.0.1", "::1"]
    assert settings.chunk_samples == 1600


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("RAWWAVE_CHUNK_MS", "5", "RAWWAVE_CHUNK_MS"),
        ("RAWWAVE_DEVICE", "tpu", "RAWWAVE_DEVICE"),
        ("RAWWAVE_REDIS_URL", "http://x", "redis://"),
        ("RAWWAVE_PORT", "abc", "RAWWAVE_PORT"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=expected):
        load_settings()


def test_table_documents_every_setting() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`RAWWAVE_{name.upper()}`" in table


def test_readme_table_is_current() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "README configuration table is stale: rawwave settings --table"
