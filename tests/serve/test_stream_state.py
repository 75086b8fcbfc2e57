"""How a streamed answer's chunks fold into its log row."""

from serve.streams import StreamState


def test_text_finish_and_usage_are_collected() -> None:
    state = StreamState()
    assert not state.absorb({"choices": [{"delta": {"content": "Hel"}}]})
    assert not state.absorb({"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]})
    assert state.absorb({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert (
        "".join(state.text),
        state.finish_reason,
        state.prompt_tokens,
        state.completion_tokens,
        state.failed,
    ) == ("Hello", "stop", 3, 2, False)


def test_an_engine_error_chunk_marks_the_answer_failed() -> None:
    state = StreamState()
    state.absorb({"choices": [{"delta": {"content": "Half an ans"}}]})
    state.absorb({"error": {"message": "engine died", "type": "InternalServerError"}})
    assert state.failed
