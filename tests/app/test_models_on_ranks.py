"""Under torchrun the app's pool is one slot, rank 0's lead of the pipeline, serving one model; the other
models are refused in our words; a failed rank reaches the browser as our message, its details kept in the log."""

from __future__ import annotations

import gradio as gr
import pytest

from app import models
from app.main import user_errors
from app.validation import ValidationError
from avatars.liveavatar.distributed import PipelineLead, RankFailure
from tests.app.conftest import unjoined_lead


@pytest.fixture
def lead_of_three(monkeypatch: pytest.MonkeyPatch) -> PipelineLead:
    monkeypatch.setattr(models, "_pool", None)
    monkeypatch.setattr(models, "_only", None)
    monkeypatch.setattr(models, "_models_found", lambda: {"tiny": None, "14b": None})
    return unjoined_lead(3)


def test_the_pool_is_the_lead_and_serves_its_model_alone(lead_of_three: PipelineLead) -> None:
    models.serve_only(
        "tiny", lead_of_three, "this server runs Tiny test model (untrained, CPU) alone, on its 3 processes"
    )
    pool = models.pipeline_pool()
    assert pool.size == 1 and pool.devices == [lead_of_three.device]
    assert models.get_pipeline("tiny") is lead_of_three
    with pool.lease("tiny") as leased:
        assert leased is lead_of_three
    availability = models.model_availability()
    assert availability["tiny"] is None
    assert (
        availability["14b"] == "this server runs Tiny test model (untrained, CPU) alone, on its 3 processes"
    )
    with pytest.raises(ValidationError, match="not available here: this server runs Tiny test model"):
        models.get_pipeline("14b")
    # What the app reads of a pipeline comes from rank 0's own copy, and the label names the layout.
    assert lead_of_three.sample_rate == lead_of_three.pipeline.sample_rate
    assert lead_of_three.size_choices() == lead_of_three.pipeline.size_choices()
    assert lead_of_three.label.endswith("· on 3 processes (2 DiT ranks, the decoder on rank 2)")


def test_a_failed_rank_is_told_in_our_words_without_its_details() -> None:
    details = "rank 2 stopped answering rank 0 (waiting for frames): [/src/gloo/pair.cc:534] closed by [10.0.0.5]:4242"
    with pytest.raises(gr.Error) as raised, user_errors():
        raise RankFailure(details)
    message = raised.value.message
    assert message.startswith("This server's model stopped working (for example a process of its multi-GPU")
    assert "10.0.0.5" not in message and "pair.cc" not in message
