"""TokenChunks to OpenAI objects, streamed and folded."""

from tierserve.actors.types import TokenChunk, TokenLogprob, TopLogprob, Usage
from tierserve.router.responses import ChatStreamFormatter, CompletionBuilder, CompletionStreamFormatter, finish_reason


def lp(token: str, tid: int, value: float) -> TokenLogprob:
    return TokenLogprob(token, tid, value, [TopLogprob(token, tid, value), TopLogprob("x", 99, value - 1)])


def test_chat_stream_role_once_per_choice_and_usage_chunk():
    fmt = ChatStreamFormatter("chatcmpl-1", "small", include_usage=True)
    first = list(fmt.format(TokenChunk(0, "Hel", [1], 1)))
    second = list(fmt.format(TokenChunk(0, "lo", [2], 2, finish_reason="stop", usage=Usage(3, 2))))
    assert first[0].choices[0].delta.role == "assistant" and first[0].choices[0].delta.content == "Hel"
    assert second[0].choices[0].delta.role is None and second[0].choices[0].finish_reason == "stop"
    assert second[1].choices == [] and second[1].usage.total_tokens == 5
    assert all(
        c.id == "chatcmpl-1" and c.model == "small" and c.object == "chat.completion.chunk" for c in first + second
    )


def test_chat_stream_without_usage_option():
    fmt = ChatStreamFormatter("c", "small", include_usage=False)
    out = list(fmt.format(TokenChunk(0, "x", [1], 1, finish_reason="length", usage=Usage(1, 1))))
    assert len(out) == 1 and out[0].choices[0].finish_reason == "length"


def test_chat_stream_logprobs():
    fmt = ChatStreamFormatter("c", "small", include_usage=False)
    (chunk,) = fmt.format(TokenChunk(0, "ab", [1, 2], 1, logprobs=[lp("a", 1, -0.1), lp("b", 2, -0.2)]))
    content = chunk.choices[0].logprobs.content
    assert [t.token for t in content] == ["a", "b"] and content[0].bytes == [97]
    assert [t.token for t in content[1].top_logprobs] == ["b", "x"]


def test_completion_stream_text_offsets_continue_across_chunks():
    fmt = CompletionStreamFormatter("cmpl-1", "small", include_usage=False)
    (a,) = fmt.format(TokenChunk(0, "ab", [1, 2], 1, logprobs=[lp("a", 1, -1), lp("b", 2, -1)]))
    (b,) = fmt.format(TokenChunk(0, "c", [3], 2, logprobs=[lp("c", 3, -1)]))
    assert a.choices[0].logprobs.text_offset == [0, 1] and b.choices[0].logprobs.text_offset == [2]
    assert b.choices[0].logprobs.top_logprobs == [{"c": -1, "x": -2}]


def test_builder_folds_n_choices():
    built = CompletionBuilder(2)
    for chunk in [
        TokenChunk(0, "a", [1], 1),
        TokenChunk(1, "x", [5], 1),
        TokenChunk(0, "b", [2], 2, finish_reason="stop"),
        TokenChunk(1, "y", [6], 2, finish_reason="length", usage=Usage(4, 4)),
    ]:
        built.add(chunk)
    chat = built.chat("chatcmpl-2", "small")
    assert [c.message.content for c in chat.choices] == ["ab", "xy"]
    assert [c.finish_reason for c in chat.choices] == ["stop", "length"]
    assert chat.usage.prompt_tokens == 4 and chat.usage.completion_tokens == 4
    completion = built.completion("cmpl-2", "small")
    assert [c.text for c in completion.choices] == ["ab", "xy"] and completion.object == "text_completion"


def test_finish_reason_vocabulary():
    assert finish_reason(None) is None
    assert finish_reason("length") == "length"
    assert finish_reason("abort") == "stop"
