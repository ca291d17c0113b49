"""jlora serve: the OpenAI-compatible server, driven by the official `openai` client over 127.0.0.1.

Every answer is checked against offline `jlora.generate` / `jlora.chat` with that adapter alone (greedy), requests
for different adapters are shown to share one batch, adapters load and unload at run time, and every bad request
gets a 4xx JSON error while the server keeps serving. The model is a tiny random Llama with a character-level
tokenizer (random weights: the text is noise, but it is the same noise both ways).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

import jlora
from jlora import serve as S

openai = pytest.importorskip("openai")
sys.path.insert(0, os.path.dirname(__file__))
from test_doctests import tiny_tokenizer  # noqa: E402

KEY = "test-key-123"
N = 8  # new tokens per request


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = dataclasses.replace(jlora.preset("tiny-llama"), max_positions=128)
    base = jlora.init_params(cfg, jax.random.key(0), std=0.3)  # peaked logits: no near-ties in greedy decoding
    tok = tiny_tokenizer(cfg.vocab_size)
    trees = {
        "a": jlora.lora.init(jax.random.key(1), cfg, base, jlora.LoraConfig(r=4, alpha=8, init=False)),
        "b": jlora.lora.init(jax.random.key(2), cfg, base, jlora.LoraConfig(r=2, alpha=2, init=False,
                                                                            target_modules=["q_proj", "v_proj"])),
        "d": jlora.dora.init(jax.random.key(3), cfg, base, jlora.DoraConfig(r=2, alpha=4, init=False))
        if "init" in {f.name for f in dataclasses.fields(jlora.DoraConfig)} else None,
    }
    trees = {k: v for k, v in trees.items() if v is not None}
    root = tmp / "allowed"
    root.mkdir()
    for name, tree in trees.items():
        jlora.save_adapter(cfg, tree, str(tmp / name))
    late = jlora.lora.init(jax.random.key(4), cfg, base, jlora.LoraConfig(r=8, alpha=8, init=False,
                                                                          target_modules=["q_proj", "v_proj"]))
    jlora.save_adapter(cfg, late, str(root / "late"))
    big = jlora.lora.init(jax.random.key(5), cfg, base, jlora.LoraConfig(
        r=32, alpha=32, init=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]))  # ~240 KB: over the 200 KB limit
    jlora.save_adapter(cfg, big, str(root / "big"))
    (root / "notadapter").mkdir()
    (root / "notadapter" / "README").write_text("not an adapter")
    jlora.save_adapter(cfg, late, str(tmp / "outside"))
    os.symlink(tmp / "outside", root / "escape")
    opts = S.ServeOptions(model_name="tiny", api_key=KEY, adapter_dirs=[str(root)], max_tokens_limit=32,
                          default_max_tokens=N, max_body_bytes=16 * 1024, max_adapter_bytes=200 * 1024)
    srv = S.start_server(cfg, base, tok, {k: str(tmp / k) for k in trees}, options=opts, max_batch=8,
                         queue_size=4, batch_wait_s=0.02)
    client = openai.OpenAI(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)
    loaded = {k: jlora.load_adapter(cfg, base, str(tmp / k)) for k in trees}
    loaded["late"] = jlora.load_adapter(cfg, base, str(root / "late"))
    yield dict(cfg=cfg, base=base, tok=tok, trees=loaded, srv=srv, client=client, engine=_engine(srv), tmp=tmp,
               root=root)
    srv.stop()


def _engine(srv) -> S.Engine:
    app = srv.server.config.app
    for route in app.routes:  # the engine is closed over by the route handlers
        for cell in route.endpoint.__closure__ or ():
            if isinstance(cell.cell_contents, S.Engine):
                return cell.cell_contents
    raise AssertionError("no engine")


def offline(world, model, prompt, n=N):
    tree = world["base"] if model in ("tiny", "__base__") else world["trees"][model]
    tok = world["tok"]
    ids = jlora.generate(world["cfg"], tree, tok.encode(prompt), n, eos_token_id=tok.eos_token_ids)
    return tok.decode(ids, skip_special_tokens=True), ("stop" if ids and ids[-1] in tok.eos_token_ids else "length")


def offline_chat(world, model, messages, n=N):
    tree = world["base"] if model in ("tiny", "__base__") else world["trees"][model]
    return jlora.chat(world["cfg"], tree, world["tok"], messages, max_new_tokens=n)


def raw(world, method, path, body=None, headers=None, key=KEY):
    """One HTTP request without the client: -> (status, parsed JSON or text)."""
    srv = world["srv"]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except json.JSONDecodeError:
        return r.status, text


def test_models_auth_and_health(world):
    c = world["client"]
    ids = [m.id for m in c.models.list()]
    assert ids[0] == "tiny" and set(ids[1:]) == set(world["trees"]) - {"late"}
    assert c.models.retrieve("a").id == "a"
    anon = openai.OpenAI(base_url=world["srv"].url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    status, body = raw(world, "GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = raw(world, "POST", "/v1/completions", {"model": "a", "prompt": "x"}, key=None)
    assert status == 401
    status, body = raw(world, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("model", ["tiny", "a", "b", "d", "__base__"])
def test_completion_equals_offline_generate(world, model):
    if model not in ("tiny", "__base__") and model not in world["trees"]:
        pytest.skip(f"no {model} adapter")
    r = world["client"].completions.create(model=model, prompt="hello world", max_tokens=N, temperature=0)
    text, reason = offline(world, model, "hello world")
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(world["tok"].encode("hello world"))
    assert r.usage.completion_tokens <= N and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == model and r.object == "text_completion"


def test_chat_and_streaming_equal_offline(world):
    c = world["client"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi there!"}]
    for model in ("a", "b", "tiny"):
        want = offline_chat(world, model, msgs)
        r = c.chat.completions.create(model=model, messages=msgs, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=N, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices
    # completions streaming, two prompts in one request (each its own choice index)
    prompts = ["abc", "hello world"]
    chunks = list(c.completions.create(model="a", prompt=prompts, max_tokens=N, temperature=0, stream=True))
    for i, p in enumerate(prompts):
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) == offline(world, "a", p)[0]
    r = c.completions.create(model="a", prompt=prompts, max_tokens=N, temperature=0)
    assert [ch.text for ch in r.choices] == [offline(world, "a", p)[0] for p in prompts]
    # token ids as the prompt
    ids = world["tok"].encode("abc")
    assert c.completions.create(model="b", prompt=ids, max_tokens=N, temperature=0).choices[0].text == \
        offline(world, "b", "abc")[0]


def test_concurrent_requests_share_one_batch_across_adapters(world):
    """Requests for the base and two adapters queued together run as one batch; each answer equals the adapter
    alone. The queue holds 4: a fifth request gets 429 and the server goes on."""
    c, engine = world["client"], world["engine"]
    jobs = [("tiny", "The quick"), ("a", "brown fox"), ("b", "jumps over"), ("a", "the lazy dog")]
    before = dict(engine.stats)
    engine.pause()
    try:
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            futs = [pool.submit(c.completions.create, model=m, prompt=p, max_tokens=N, temperature=0)
                    for m, p in jobs]
            t0 = time.monotonic()
            while engine.pending < len(jobs) and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            assert engine.pending == len(jobs)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model="a", prompt="one too many", max_tokens=2, temperature=0)
            engine.resume()
            got = [f.result().choices[0].text for f in futs]
    finally:
        engine.resume()
    assert got == [offline(world, m, p)[0] for m, p in jobs]
    assert engine.stats["batches"] == before["batches"] + 1  # all four in one forward per step
    assert engine.stats["largest_batch"] >= 4 and engine.stats["adapters_in_batch"] >= 3


def test_adapters_load_and_unload_at_run_time(world):
    c, engine = world["client"], world["engine"]
    c.completions.create(model="a", prompt="hello world", max_tokens=N, temperature=0)  # this shape compiled
    compiled = (S._prefill._cache_size(), S._step._cache_size())
    status, body = raw(world, "POST", "/v1/adapters", {"name": "late", "path": "late"})
    assert status == 201 and body["id"] == "late", body
    assert "late" in [m.id for m in c.models.list()]
    r = c.completions.create(model="late", prompt="hello world", max_tokens=N, temperature=0)
    assert r.choices[0].text == offline(world, "late", "hello world")[0]
    assert (S._prefill._cache_size(), S._step._cache_size()) == compiled  # a free slot, same rank bucket
    # loading it again needs replace; replacing works; the absolute path inside the root works too
    assert raw(world, "POST", "/v1/adapters", {"name": "late", "path": "late"})[0] == 409
    assert raw(world, "POST", "/v1/adapters", {"name": "late", "path": str(world["root"] / "late"),
                                               "replace": True})[0] == 201
    # refusals: outside the allowed directory (also through a symlink), missing, not an adapter, too big
    for path, status, code in [(str(world["tmp"] / "outside"), 403, "path_not_allowed"),
                               ("../outside", 403, "path_not_allowed"), ("escape", 403, "path_not_allowed"),
                               ("missing", 404, "adapter_not_found"), ("notadapter", 400, "invalid_adapter"),
                               ("big", 413, "adapter_too_large")]:
        got, body = raw(world, "POST", "/v1/adapters", {"name": "x1", "path": path})
        assert isinstance(body, dict) and "error" in body, (path, got, body)
        assert (got, body["error"]["code"]) == (status, code), (path, body)
        assert body["error"]["param"] == "path" and body["error"]["message"]
    for bad in [{"name": "bad name!", "path": "late"}, {"name": "tiny", "path": "late"}, {"name": "ok"},
                {"name": "ok", "path": "late", "replace": "yes"}]:
        assert raw(world, "POST", "/v1/adapters", bad)[0] == 400, bad
    assert raw(world, "POST", "/v1/adapters", {"name": "x2", "path": "late"}, key=None)[0] == 401
    # unload
    status, body = raw(world, "DELETE", "/v1/adapters/late")
    assert status == 200 and body["deleted"] is True
    assert "late" not in engine.adapter_names
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="late", prompt="x", max_tokens=2)
    assert raw(world, "DELETE", "/v1/adapters/late")[0] == 404
    assert c.completions.create(model="a", prompt="hello world", max_tokens=N, temperature=0).choices[0].text == \
        offline(world, "a", "hello world")[0]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(world):
    ok = {"model": "a", "prompt": "hi", "max_tokens": 2}
    cases = [
        (b"{not json", 400, None), (b"[1, 2]", 400, None), ({"prompt": "hi"}, 400, "model"),
        ({**ok, "model": "nope"}, 404, "model"), ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": 33}, 400, "max_tokens"), ({**ok, "max_tokens": "many"}, 400, "max_tokens"),
        ({**ok, "temperature": -1}, 400, "temperature"), ({**ok, "temperature": 3}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"), ({**ok, "top_k": -2}, 400, "top_k"), ({**ok, "n": 2}, 400, "n"),
        ({**ok, "logprobs": 2}, 400, "logprobs"), ({**ok, "echo": True}, 400, "echo"),
        ({**ok, "presence_penalty": 0.5}, 400, "presence_penalty"), ({**ok, "best_of": 3}, 400, "best_of"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"), ({**ok, "stop": 5}, 400, "stop"),
        ({**ok, "seed": "x"}, 400, "seed"), ({**ok, "ignore_eos": 1}, 400, "ignore_eos"), ({**ok, "stream": "yes"}, 400, "stream"),
        ({**ok, "prompt": "x" * 127, "max_tokens": 8}, 400, "max_tokens"), ({**ok, "prompt": "x" * 200}, 400,
                                                                             "prompt"),
        ({**ok, "prompt": []}, 400, "prompt"), ({**ok, "prompt": [5, 999]}, 400, "prompt"),
        ({**ok, "prompt": None}, 400, "prompt"), ({**ok, "prompt": [[1], "a"]}, 400, "prompt"),
        ({**ok, "prompt": ["x"] * 40}, 400, "prompt"),
    ]
    for body, status, param in cases:
        got, out = raw(world, "POST", "/v1/completions", body)
        assert got == status, (body, out)
        assert set(out["error"]) == {"message", "type", "param", "code"} and out["error"]["message"], out
        if param:
            assert out["error"]["param"] == param, (body, out)
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body, param in [({**chat, "messages": []}, "messages"), ({**chat, "messages": "hi"}, "messages"),
                        ({**chat, "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
                        ({**chat, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
                        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "messages[0].content"),
                        ({**chat, "tools": [{"type": "function"}]}, "tools"),
                        ({**chat, "response_format": {"type": "json_object"}}, "response_format")]:
        got, out = raw(world, "POST", "/v1/chat/completions", body)
        assert (got, out["error"]["param"]) == (400, param), (body, out)
    got, out = raw(world, "POST", "/v1/completions", json.dumps({**ok, "prompt": "x" * 20000}).encode())
    assert got == 413 and out["error"]["code"] == "body_too_large"
    assert raw(world, "GET", "/v1/nothing")[0] == 404
    assert raw(world, "GET", "/v1/completions")[0] == 405
    # and it still answers
    r = world["client"].completions.create(model="a", prompt="hello world", max_tokens=N, temperature=0)
    assert r.choices[0].text == offline(world, "a", "hello world")[0]


def test_stop_strings_and_seeded_sampling(world):
    c = world["client"]
    full, _ = offline(world, "a", "hello world", 16)
    stop = full[5:7]
    cut = full[:full.find(stop)]
    r = c.completions.create(model="a", prompt="hello world", max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(c.completions.create(model="a", prompt="hello world", max_tokens=16, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.completions.create(model="a", prompt="hello world", max_tokens=20, temperature=0,
                             extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (20, "length")
    ids = jlora.generate(world["cfg"], world["trees"]["a"], world["tok"].encode("hello world"), 20, eos_token_id=())
    assert r.choices[0].text == world["tok"].decode(ids, skip_special_tokens=True)
    kw = dict(model="b", prompt="hello world", max_tokens=N, temperature=1.0, top_p=0.9, top_k=50)
    one = c.completions.create(seed=7, **{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 50})
    two = c.completions.create(seed=7, **{k: v for k, v in kw.items() if k != "top_k"}, extra_body={"top_k": 50})
    other = [c.completions.create(seed=s, model="b", prompt="hello world", max_tokens=N, temperature=1.0)
             .choices[0].text for s in (1, 2, 3)]
    assert one.choices[0].text == two.choices[0].text  # the seed fixes the draw
    assert len(set(other)) > 1


def test_request_timeout_and_shutdown_fail_cleanly(world):
    opts = S.ServeOptions(model_name="t", request_timeout_s=0.0)
    srv = S.start_server(world["cfg"], world["base"], world["tok"], options=opts)
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="t", prompt="hi", max_tokens=2)
        assert e.value.status_code == 504
    finally:
        srv.stop()
    engine = S.make_engine(world["cfg"], world["base"], world["tok"])  # never started: close fails the queue
    events = []
    engine.submit(S.GenRequest(prompt=[5, 6], max_tokens=2, emit=lambda k, p: events.append((k, p))))
    engine.close()
    assert events[0][0] == "error" and events[0][1].status == 503
    with pytest.raises(S.ApiError) as e:
        engine.submit(S.GenRequest(prompt=[5], max_tokens=2, emit=lambda k, p: None))
    assert e.value.status == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_answers_then_exits_cleanly_on_sigterm(world, tmp_path):
    cfg, base = world["cfg"], world["base"]
    model = tmp_path / "model"
    jlora.save_pretrained(cfg, base, str(model))
    world["tok"].save(str(model))
    port = _free_port()
    env = {**os.environ, "JLORA_API_KEY": "envkey", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", "serve", "--model", str(model), "--adapter",
                             f"a={world['tmp'] / 'a'}", "--port", str(port), "--name", "tinymodel",
                             "--log-level", "warning"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="envkey", max_retries=0)
        t0 = time.monotonic()
        while True:
            try:
                ids = [m.id for m in c.models.list()]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() - t0 < 120
                time.sleep(0.2)
        assert ids == ["tinymodel", "a"]
        r = c.completions.create(model="a", prompt="hello world", max_tokens=N, temperature=0)
        assert r.choices[0].text == offline(world, "a", "hello world")[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "jlora serve: tinymodel" in err and "jlora serve: stopped" in err


@pytest.mark.parametrize("args, msg", [
    (["--adapter", "noequals"], "expected NAME=DIR"),
    (["--adapter", "a=/nonexistent/dir"], "no adapter directory"),
    (["--adapter-dir", "/nonexistent/dir"], "not a directory"),
])
def test_cli_serve_bad_flags_are_one_line_errors(args, msg):
    from jlora.cli import main

    r = subprocess.run([sys.executable, "-m", "jlora.cli", "serve", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert main  # the module entry point is the CLI's


def _drive(engine, until, limit=500):
    """Runs the engine's worker steps in this thread (no worker thread) until ``until()``."""
    for _ in range(limit):
        if until():
            return
        engine.work_once()
    raise AssertionError("the engine did not get there")


def _req(world, adapter, prompt, n, out, **kw):
    key = len(out)
    out[key] = {"text": "", "done": None}

    def emit(kind, payload):
        if kind == "delta":
            out[key]["text"] += payload
        else:
            out[key]["done"] = payload

    return S.GenRequest(prompt=world["tok"].encode(prompt), adapter=adapter, max_tokens=n, eos=(), emit=emit,
                        **{"temperature": 0.0, **kw}), key


def test_continuous_batching_requests_join_a_running_batch(world):
    """A request arriving mid-decode joins the running batch (a new row, then a freed one) and every answer still
    equals the adapter alone; a sampled request draws the same tokens alone and joined (per-row keys)."""
    cfg, base, tok = world["cfg"], world["base"], world["tok"]
    trees = {k: world["trees"][k] for k in ("a", "b")}
    engine = S.make_engine(cfg, base, tok, trees, max_batch=2, batch_wait_s=0.0)
    out = {}
    r1, k1 = _req(world, "a", "hello world", 20, out)
    engine.submit(r1)
    _drive(engine, lambda: engine.stats["steps"] >= 3)
    r2, k2 = _req(world, "b", "abc", 6, out)
    engine.submit(r2)
    _drive(engine, lambda: engine.stats["joined"] == 1)  # row 2 added to the running batch
    assert engine._batch.size == 2 and engine.pending == 0
    r3, k3 = _req(world, None, "xyz", 5, out)
    engine.submit(r3)
    engine.work_once()
    assert engine.pending == 1  # no free row and max_batch reached: it waits ...
    _drive(engine, lambda: engine.stats["joined"] == 2)  # ... and takes b's row when b is done
    assert out[k2]["done"] is not None and out[k1]["done"] is None
    r4, k4 = _req(world, "a", "the lazy dog", 6, out, temperature=1.0, seed=11)
    engine.submit(r4)
    _drive(engine, lambda: all(v["done"] for v in out.values()))
    assert engine.stats["batches"] == 1 and engine.stats["joined"] == 3
    for key, (model, prompt, n) in {k1: ("a", "hello world", 20), k2: ("b", "abc", 6),
                                    k3: ("tiny", "xyz", 5)}.items():
        tree = base if model == "tiny" else world["trees"][model]
        ids = jlora.generate(cfg, tree, tok.encode(prompt), n, eos_token_id=())
        assert out[key]["text"] == tok.decode(ids, skip_special_tokens=True), model
        assert out[key]["done"] == {"finish_reason": "length", "prompt_tokens": len(tok.encode(prompt)),
                                    "completion_tokens": n}
    alone = S.make_engine(cfg, base, tok, trees, batch_wait_s=0.0)
    out2 = {}
    r5, k5 = _req(world, "a", "the lazy dog", 6, out2, temperature=1.0, seed=11)
    alone.submit(r5)
    _drive(alone, lambda: out2[k5]["done"] is not None)
    assert out2[k5]["text"] == out[k4]["text"]


def _raw_to(srv, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, (json.loads(text) if text.startswith("{") else text)


def test_keyless_local_server_refuses_cross_site_and_odd_input(world, tmp_path):
    """Without a key on 127.0.0.1: foreign Host/Origin headers (a web page, DNS rebinding) and non-JSON content
    types are refused; adapter directories with links out or non-regular files are refused; --max-adapters holds."""
    root = tmp_path / "root"
    root.mkdir()
    jlora.save_adapter(world["cfg"], world["trees"]["late"], str(root / "ok"))
    (root / "link").mkdir()
    (root / "link" / "adapter_config.json").symlink_to(world["tmp"] / "outside" / "adapter_config.json")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "adapter_model.safetensors")
    opts = S.ServeOptions(model_name="t", adapter_dirs=[str(root)])
    srv = S.start_server(world["cfg"], world["base"], world["tok"], {"a": world["trees"]["a"]}, options=opts,
                         max_adapters=1)
    try:
        js = {"Content-Type": "application/json"}
        body = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 2}).encode()
        assert _raw_to(srv, "POST", "/v1/completions", body, js)[0] == 200
        assert _raw_to(srv, "POST", "/v1/completions", body, {**js, "Origin": "http://localhost:3000"})[0] == 200
        for extra, status in [({"Origin": "https://evil.example"}, 403), ({"Host": "evil.example"}, 403),
                              ({"Content-Type": "text/plain"}, 415), ({"Content-Type": ""}, 415)]:
            got, out = _raw_to(srv, "POST", "/v1/completions", body, {**js, **extra})
            assert got == status and out["error"]["message"], (extra, got, out)
        assert _raw_to(srv, "GET", "/v1/models", b"", {"Host": "evil.example"})[0] == 403
        deep = b'{"model": "a", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        assert _raw_to(srv, "POST", "/v1/completions", deep, js)[0] in (400, 413)
        for path, status in [("link", 403), ("fifo", 400), ("o\x00k", 400)]:
            got, out = _raw_to(srv, "POST", "/v1/adapters", json.dumps({"name": "n", "path": path}).encode(), js)
            assert got == status, (path, got, out)
        got, out = _raw_to(srv, "POST", "/v1/adapters", json.dumps({"name": "n", "path": "ok"}).encode(), js)
        assert (got, out["error"]["code"]) == (409, "too_many_adapters"), out
    finally:
        srv.stop()


def test_engine_failures_fail_only_their_requests(world, monkeypatch):
    """An exception while starting a batch answers its requests with 500 and the engine goes on; a request whose
    join fails gets a 500 while the running batch finishes; active rows never exceed a max_batch of 3; a tiny
    temperature is greedy; a cancelled request is dropped."""
    cfg, base, tok = world["cfg"], world["base"], world["tok"]
    real_prefill, real_one = S._prefill, S._prefill_one

    def boom(*a, **k):
        raise RuntimeError("device on fire")

    def wait(cond, limit=60):
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < limit
            time.sleep(0.01)

    # the worker thread turns an exception into answers and goes on
    engine = S.make_engine(cfg, base, tok, {"a": world["trees"]["a"]}, max_batch=3, batch_wait_s=0.0)
    out2 = {}
    r2, k2 = _req(world, "a", "hello", 4, out2)
    monkeypatch.setattr(S, "_prefill", boom)
    engine.submit(r2)
    engine.start()
    try:
        wait(lambda: out2[k2]["done"] is not None)
        monkeypatch.setattr(S, "_prefill", real_prefill)
        r3, k3 = _req(world, "a", "hello", 4, out2)
        engine.submit(r3)
        wait(lambda: out2[k3]["done"] is not None)
    finally:
        engine.close()
    assert isinstance(out2[k2]["done"], S.ApiError) and out2[k2]["done"].status == 500
    assert out2[k3]["done"]["finish_reason"] == "length"
    # a join that fails: only the joiner
    out3 = {}
    e3 = S.make_engine(cfg, base, tok, {"a": world["trees"]["a"]}, max_batch=3, batch_wait_s=0.0)
    ra, ka = _req(world, "a", "hello world", 12, out3)
    e3.submit(ra)
    _drive(e3, lambda: e3.stats["steps"] >= 2)
    monkeypatch.setattr(S, "_prefill_one", boom)
    rb, kb = _req(world, None, "abc", 4, out3)
    e3.submit(rb)
    e3.work_once()
    monkeypatch.setattr(S, "_prefill_one", real_one)
    assert isinstance(out3[kb]["done"], S.ApiError) and out3[kb]["done"].status == 500
    # three more join (max_batch 3: two of them), a cancelled one is dropped, a tiny temperature is greedy
    rc, kc = _req(world, None, "abc", 4, out3, temperature=1e-39)
    rd, kd = _req(world, "a", "xyz", 3, out3)
    rx, kx = _req(world, "a", "never", 3, out3)
    rx.cancelled = True
    re_, ke = _req(world, "a", "qq", 3, out3)
    for r in (rc, rd, rx, re_):
        e3.submit(r)
    _drive(e3, lambda: all(out3[k]["done"] is not None for k in (ka, kc, kd, ke)))
    assert e3.stats["largest_batch"] <= 3 and out3[kx]["done"] is None
    assert out3[ka]["text"] == tok.decode(jlora.generate(cfg, world["trees"]["a"], tok.encode("hello world"), 12,
                                                         eos_token_id=()), skip_special_tokens=True)
    assert out3[kc]["text"] == tok.decode(jlora.generate(cfg, base, tok.encode("abc"), 4, eos_token_id=()),
                                          skip_special_tokens=True)


def test_non_streaming_client_that_disconnects_is_cancelled(world):
    engine = world["engine"]
    engine.pause()
    try:
        sock = socket.create_connection((world["srv"].host, world["srv"].port))
        body = json.dumps({"model": "a", "prompt": "bye", "max_tokens": 8}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body)
        t0 = time.monotonic()
        while engine.pending < 1:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        sock.close()
        t0 = time.monotonic()
        while not engine._waiting[0].cancelled:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
    finally:
        engine.resume()
    t0 = time.monotonic()
    while engine.pending:
        assert time.monotonic() - t0 < 10
        time.sleep(0.01)
