"""README.md is the Hugging Face Space card: its front matter parses with huggingface_hub's card parser, names only
keys of the Spaces configuration reference, points at files and versions that exist, links the models the app
downloads, and the card says what each hardware runs, within 200 lines."""

from importlib.metadata import version
from pathlib import Path

from huggingface_hub import SpaceCard

from avatars.liveavatar.weights.hub import SOURCES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# https://huggingface.co/docs/hub/spaces-config-reference: the keys a Space's front matter may hold
SPACE_KEYS = {
    "title", "emoji", "colorFrom", "colorTo", "sdk", "python_version", "sdk_version", "suggested_hardware",
    "suggested_storage", "app_file", "app_port", "base_path", "fullWidth", "header", "short_description", "models",
    "datasets", "tags", "thumbnail", "pinned", "hf_oauth", "hf_oauth_scopes", "hf_oauth_expiration_minutes",
    "hf_oauth_authorized_org", "disable_embedding", "startup_duration_timeout", "custom_headers", "preload_from_hub",
    "license",
}  # fmt: skip
COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4", "l40sx1", "a10g-small", "a10g-large",
            "a100-large"}  # fmt: skip


def test_the_front_matter_is_a_valid_space_config():
    card = SpaceCard.load(README)  # raises on YAML it cannot read
    data = card.data.to_dict()
    assert set(data) <= SPACE_KEYS, set(data) - SPACE_KEYS
    assert data["sdk"] == "gradio" and data["sdk_version"] == version("gradio")
    assert (ROOT / data["app_file"]).is_file()
    assert data["colorFrom"] in COLORS and data["colorTo"] in COLORS
    assert data["suggested_hardware"] in HARDWARE
    assert len(data["short_description"]) <= 60  # longer ones are refused when the Space is pushed
    assert data["models"] == [source.repo_id for source in SOURCES]  # the repositories the app downloads from
    assert card.text.lstrip().startswith("# ispa-avatar")


def test_the_card_says_what_each_hardware_runs_within_200_lines():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    section = text[text.index("## Deploy as a Hugging Face Space") :]
    section = section[: section.index("\n## ", 1)]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    cpu, zero, big = (
        next(row for name, row in rows.items() if name.startswith(k)) for k in ("CPU", "ZeroGPU", "80 GB")
    )
    assert "tiny test model" in cpu
    for row in (zero, big):
        assert "LiveAvatar 14B" in row and "FP8" in row and "KV" in row
    assert "`fp8` KV" in zero
    assert "not measured" in section
