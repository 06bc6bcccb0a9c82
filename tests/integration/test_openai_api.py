"""The OpenAI-compatible HTTP API, driven by the official `openai` client against the real engine."""

import openai
import pytest

from tierserve.actors.types import GenerateRequest, SamplingOptions

from .conftest import MODELS, TIER, TIERS

pytestmark = pytest.mark.integration

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_auto_and_tiers(client):
    assert [m.id for m in client.models.list()] == MODELS


def test_a_model_is_retrieved_as_listed_and_an_unknown_one_is_404(client):
    listed = {m.id: m for m in client.models.list()}
    for name in MODELS:
        assert client.models.retrieve(name) == listed[name]
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_health_reports_each_tier(http):
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "serving": TIERS, "tiers": {t: "ok" for t in TIERS}}


def test_chat_greedy_is_deterministic_and_reports_usage(client):
    a = client.chat.completions.create(model="auto", messages=CAPITAL, max_tokens=24, temperature=0)
    b = client.chat.completions.create(model=TIER, messages=CAPITAL, max_tokens=24, temperature=0)
    assert a.choices[0].message.content and a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"
    assert a.model == TIER and a.id.startswith("chatcmpl-")
    assert a.usage.prompt_tokens > 10 and 0 < a.usage.completion_tokens <= 24
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_matches_non_stream(client):
    whole = client.chat.completions.create(model="auto", messages=CAPITAL, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="auto",
            messages=CAPITAL,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_says_which_tier_served_it(client):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=CAPITAL, max_tokens=4, stream=True)
    assert raw.headers["x-tierserve-tier"] == TIER
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert list(raw.parse())


def test_max_tokens_ends_with_length(client):
    r = client.completions.create(
        model="auto", prompt="Count: one, two, three,", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_stop_sequence_cuts_the_text(client):
    free = client.completions.create(model="auto", prompt="Count: one, two, three,", max_tokens=12, temperature=0)
    assert "," in free.choices[0].text
    stopped = client.completions.create(
        model="auto", prompt="Count: one, two, three,", max_tokens=12, temperature=0, stop=[","]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text.split(",")[0]


def test_n_choices_and_seed(client):
    kwargs = dict(
        model="auto",
        prompt="Once upon a time",
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 3 * 12  # usage counts every choice


def test_top_k_and_top_p_are_honoured(client):
    greedy = client.completions.create(model="auto", prompt="The sky is", max_tokens=8, temperature=0)
    top1 = client.completions.create(
        model="auto", prompt="The sky is", max_tokens=8, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )
    nucleus = client.completions.create(
        model="auto", prompt="The sky is", max_tokens=8, temperature=1.5, top_p=1e-6, seed=4
    )
    assert top1.choices[0].text == greedy.choices[0].text == nucleus.choices[0].text


def test_completion_logprobs(client):
    r = client.completions.create(model="auto", prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(len(lp.tokens)))
    assert lp.text_offset[0] == 0


def test_chat_logprobs_streamed(client):
    chunks = list(
        client.chat.completions.create(
            model="auto", messages=CAPITAL, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
    )
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(tokens) == 6 or chunks[-1].choices[0].finish_reason == "stop"
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert "".join(t.token for t in tokens) == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_completion_from_token_ids(client, tier_handle):
    # The embedded default's input guards cannot read token ids, so the ingress refuses them ...
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="auto", prompt=[1, 504, 5620, 314], max_tokens=6, temperature=0)
    assert err.value.code == "unguardable_input" and err.value.param == "prompt"
    # ... and the tier serves them (a service whose operator allows them unchecked).
    request = GenerateRequest("ids", SamplingOptions(max_tokens=6, temperature=0), prompt_token_ids=[1, 504, 5620, 314])
    chunks = [c for batch in tier_handle.options(stream=True).generate.remote(request) for c in batch]
    assert chunks[-1].usage.prompt_tokens == 4 and "".join(c.text for c in chunks)
    with pytest.raises(Exception, match="outside the model's vocabulary"):
        request = GenerateRequest("bad", SamplingOptions(max_tokens=1), prompt_token_ids=[1, 10_000_000])
        list(tier_handle.options(stream=True).generate.remote(request))


def test_completion_stream(client):
    chunks = list(
        client.completions.create(model="auto", prompt="The sky is", max_tokens=8, temperature=0, stream=True)
    )
    whole = client.completions.create(model="auto", prompt="The sky is", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_logit_bias_bans_and_forces_tokens_and_refuses_ids_past_the_vocabulary(client):
    from transformers import AutoTokenizer

    from tierserve.actors.checkpoints import prepare_embedded

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded("smollm2-135m-instruct", progress=False))
    prompt = "The capital of France is"

    def greedy(**fields) -> str:
        reply = client.completions.create(model=TIER, prompt=prompt, max_tokens=3, temperature=0, **fields)
        return reply.choices[0].text

    first = tokenizer.encode(greedy(), add_special_tokens=False)[0]
    banned = greedy(logit_bias={str(first): -100})
    assert tokenizer.encode(banned, add_special_tokens=False)[0] != first
    (banana,) = tokenizer.encode(" banana", add_special_tokens=False)
    assert greedy(logit_bias={str(banana): 100}) == " banana" * 3

    with pytest.raises(openai.BadRequestError) as err:
        greedy(logit_bias={str(len(tokenizer) + 1000): 5})
    assert err.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="auto", messages=CAPITAL, max_tokens=1, logit_bias={"7": 500})
    assert err.value.param == "logit_bias.7"
