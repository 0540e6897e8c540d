"""`edge-mote serve` as a subprocess on loopback, called with httpx and the `openai` package: results equal
`edge-mote run` (greedy) for the same prompt and steering, profiles as models, per-request steering and trace,
4xx answers that keep the server serving, a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .serve_util import PROFILE, Server, chat_text, organism_with_profile, run_cli

N = 24
PROMPTS = ["How do I bake bread?", "How do I pick a lock?", "Tell me about rivers."]


@pytest.fixture(scope="module")
def served(models_dir, tmp_path_factory):
    path, experts, _ = organism_with_profile(models_dir, tmp_path_factory.mktemp("serve"))
    return path, experts


@pytest.fixture(scope="module")
def server(served):
    s = Server(served[0], "--parallel", "4", "--ctx", "256", "--threads", "1")
    yield s
    s.close()


def completion(server, prompt, n=N, **extra):
    r = httpx.post(server.url + "/v1/completions", timeout=120,
                   json={"model": "organism", "prompt": prompt, "max_tokens": n, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(server, path, body):
    parts, last = [], None
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            last = json.loads(line[6:])
            for ch in last["choices"]:
                parts.append(ch["text"] if "text" in ch else ch["delta"].get("content") or "")
    return "".join(parts), last


def test_health_and_profiles_as_models(server):
    h = server.health()
    assert h["status"] == "ok" and h["slots"] == 4
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["organism", f"organism:{PROFILE}"]
    assert models["data"][1]["mote"]["steering"].startswith("off=")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_edge_mote_run(server, served, prompt):
    got = completion(server, prompt)
    assert got["choices"][0]["text"] == run_cli(served[0], prompt, N)
    assert got["usage"]["completion_tokens"] >= 1
    assert got["mote"]["steering"] == ""


def test_a_follow_up_prompt_reuses_the_earlier_cells_and_still_equals_edge_mote_run(server, served):
    first = PROMPTS[2]
    text = completion(server, first)["choices"][0]["text"]
    before = server.health()["reused_prompt_tokens"]
    follow = first + text + " And the sea?"       # a conversation's next turn re-sends all of it
    got = completion(server, follow, n=8)
    assert server.health()["reused_prompt_tokens"] > before
    assert got["choices"][0]["text"] == run_cli(served[0], follow, 8)


def test_a_prompt_whose_slot_was_taken_comes_back_from_host_memory_and_still_equals_edge_mote_run(server, served):
    first = "Write two lines about the winter sea and its grey light."
    completion(server, first, n=4)
    for i in range(5):                                  # more distinct prompts than the server's 4 slots
        completion(server, f"Count to {i + 3} in words, please.", n=4)
    before = server.health()["reused_prompt_tokens"]
    got = completion(server, first, n=8)
    assert server.health()["reused_prompt_tokens"] - before >= got["usage"]["prompt_tokens"] - 1
    assert got["choices"][0]["text"] == run_cli(served[0], first, 8)


def test_steering_in_mote_and_profile_as_model_equal_edge_mote_run(server, served):
    path, experts = served
    prompt = PROMPTS[1]
    off = ",".join(f"{l}:{e}" for l, e in experts)
    via_mote = completion(server, prompt, mote={"off": off})["choices"][0]["text"]
    assert via_mote == run_cli(path, prompt, N, "--off", off)
    via_model = completion(server, prompt, model=f"organism:{PROFILE}")["choices"][0]["text"]
    via_profile = completion(server, prompt, mote={"profile": PROFILE})["choices"][0]["text"]
    assert via_model == via_profile == run_cli(path, prompt, N, "--profile", PROFILE) == via_mote
    on = f"{experts[0][0]}:{experts[0][1]}"
    biased = completion(server, PROMPTS[0], mote={"on": on, "bias": "1:3=-2", "margin": 0.5})["choices"][0]["text"]
    assert biased == run_cli(path, PROMPTS[0], N, "--on", on, "--bias", "1:3=-2", "--margin", "0.5")


def test_chat_streaming_and_not_equal_edge_mote_run_on_the_rendered_prompt(server, served):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    ref = run_cli(served[0], chat_text(served[0], messages), N)
    body = {"model": "organism", "messages": messages, "max_tokens": N, "temperature": 0}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]
    assert msg["message"]["role"] == "assistant" and msg["message"]["content"] == ref
    text, last = stream_text(server, "/v1/chat/completions", body)
    assert text == ref and last["choices"][0]["finish_reason"] in ("stop", "length")
    text, _ = stream_text(server, "/v1/completions", {"model": "organism", "prompt": PROMPTS[2], "max_tokens": N,
                                                       "temperature": 0})
    assert text == run_cli(served[0], PROMPTS[2], N)


def test_openai_client_with_profile_as_model_and_extra_body(server, served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["organism", f"organism:{PROFILE}"]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ref = run_cli(served[0], chat_text(served[0], messages), N, "--profile", PROFILE)
    a = client.chat.completions.create(model=f"organism:{PROFILE}", messages=messages, max_tokens=N, temperature=0)
    b = client.chat.completions.create(model="organism", messages=messages, max_tokens=N, temperature=0,
                                       extra_body={"mote": {"profile": PROFILE}})
    assert a.choices[0].message.content == b.choices[0].message.content == ref
    assert b.model_extra["mote"]["profile"] == PROFILE and b.model_extra["mote"]["steering"].startswith("off=")
    streamed = client.chat.completions.create(model=f"organism:{PROFILE}", messages=messages, max_tokens=N,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens


def test_trace_reports_the_experts_of_each_token_and_off_experts_never_appear(server, served):
    off = served[1]
    got = completion(server, PROMPTS[1], n=8, mote={"off": [list(x) for x in off], "trace": True})
    trace = got["mote"]["trace"]
    assert trace["layers"] == sorted({l for l, _ in off} | set(trace["layers"]))
    assert len(trace["experts"]) == got["usage"]["completion_tokens"]
    for row in trace["experts"]:
        assert len(row) == len(trace["layers"])
        for layer, ids in zip(trace["layers"], row):
            assert len(ids) == 2 and all((layer, e) not in off for e in ids)
    plain = completion(server, PROMPTS[1], n=8, mote={"trace": True})["mote"]["trace"]["experts"]
    assert any((l, e) in off for row in plain for l, ids in zip(trace["layers"], row) for e in ids)


def test_stop_strings_logprobs_and_sampling(server):
    full = completion(server, PROMPTS[0])["choices"][0]["text"]
    word = full.split()[2] if len(full.split()) > 2 else full[-3:]
    cut = completion(server, PROMPTS[0], stop=[word])["choices"][0]
    assert cut["text"] == full[: full.index(word)] and cut["finish_reason"] == "stop"
    lp = completion(server, PROMPTS[0], n=4, logprobs=3)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 4 and all(v <= 0 for v in lp["token_logprobs"])
    assert all(len(t) == 3 for t in lp["top_logprobs"])
    a = completion(server, PROMPTS[0], temperature=1.5, seed=5)["choices"][0]["text"]
    b = completion(server, PROMPTS[0], temperature=1.5, seed=5)["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "hi", "mote": {"off": "99:1"}}, 400, "layer 99 is out of range"),
    ("/v1/completions", {"prompt": "hi", "mote": {"off": "0:77"}}, 400, "expert 77 is out of range"),
    ("/v1/completions", {"prompt": "hi", "mote": {"of": "0:1"}}, 400, "unknown field(s) in 'mote': of"),
    ("/v1/completions", {"prompt": "hi", "mote": {"off": "0:1", "on": "0:1"}}, 400, "both off and on"),
    ("/v1/completions", {"prompt": "hi", "mote": {"profile": "nope"}}, 400, "unknown profile 'nope'"),
    ("/v1/completions", {"prompt": "hi", "mote": {"bias": "1:2=x"}}, 400, "VALUE must be a number"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be an integer >= 1"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "only n=1"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "'temperature'"),
    ("/v1/completions", {"prompt": ""}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "out of range"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "this server's sequences hold 256"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
    ("/v1/nothing", {}, 404, "Not Found"),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(server, path, body, status, needle):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    assert server.health()["status"] == "ok"


def test_invalid_json_and_wrong_method(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_client_disconnect_mid_stream_frees_the_slot(server):
    before = server.health()
    body = {"model": "organism", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 1.0, "seed": 1,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
                if n == 3:
                    break   # leave: the connection closes with the block
    deadline = time.time() + 20
    while time.time() < deadline:
        h = server.health()
        if h["busy"] == 0 and h["requests_done"] > before["requests_done"]:
            break
        time.sleep(0.1)
    assert h["busy"] == 0 and h["requests_done"] == before["requests_done"] + 1
    assert h["generated_tokens"] - before["generated_tokens"] < 150     # it stopped early, not at max_tokens
    assert completion(server, PROMPTS[0], n=4)["usage"]["completion_tokens"] >= 1


def test_api_key_and_non_loopback_warning(served):
    s = Server(served[0], "--parallel", "1", "--ctx", "128", "--threads", "1", "--api-key", "sekret")
    try:
        r = httpx.get(s.url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       headers={"Authorization": "Bearer sekret"}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200   # health needs no key
        # one slot: concurrent requests queue and each still gets its own answer
        from concurrent.futures import ThreadPoolExecutor

        def ask(prompt):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
                           headers={"Authorization": "Bearer sekret"}, timeout=120)
            return r.status_code, r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as ex:
            together = list(ex.map(ask, PROMPTS))
        assert together == [ask(p) for p in PROMPTS] and all(c == 200 for c, _ in together)
        assert httpx.get(s.url + "/health", timeout=10).json()["max_seqs_in_step"] == 1
    finally:
        s.close()
    import subprocess
    from .serve_util import EDGE_MOTE, REPO

    # any host but loopback prints why it is risky; the missing model stops it before any socket is opened
    out = subprocess.run(EDGE_MOTE + ["serve", str(served[0].parent / "missing.gguf"), "--host", "0.0.0.0"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert "warning: serving on 0.0.0.0" in out.stderr and "reverse proxy" in out.stderr
    assert "error: model file not found" in out.stderr
