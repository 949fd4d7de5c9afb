"""Drives two running `hadal serve` instances with the official `openai` client.

usage: openai_client.py MAIN_URL TINY_URL API_KEY
MAIN serves with --api-key API_KEY; TINY with --max-running 1 --max-queue 1 --prefix-cache 0.
Exits non-zero (with the failing check) on any failure.
"""
import json
import sys
import threading
import urllib.error
import urllib.request

import openai

MAIN, TINY, KEY = sys.argv[1], sys.argv[2], sys.argv[3]
main = openai.OpenAI(base_url=MAIN + "/v1", api_key=KEY, max_retries=0, timeout=300)
tiny = openai.OpenAI(base_url=TINY + "/v1", api_key="unused", max_retries=0, timeout=300)
MODEL = main.models.list().data[0].id


def greedy(client, messages, n=12, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0, **kw)


def stream_text(client, messages, n=12):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage]
    return text, finish, usage


def raw(url, body, headers=None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)
    print("ok:", what)


user = [{"role": "user", "content": "Tell me about the sea."}]

# Non-streaming and streaming agree (greedy), with usage.
r = greedy(main, user)
check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12, "non-streaming completion")
text, finish, usage = stream_text(main, user)
check(text == r.choices[0].message.content, "streaming text equals non-streaming text")
check(finish == ["length"] and usage and usage[0].completion_tokens == 12, "stream ends with finish_reason and usage")

# Thinking mode returns reasoning apart; seeds reproduce sampled output.
t = main.chat.completions.create(model=MODEL, messages=user, max_tokens=6, extra_body={"thinking": {"type": "enabled"}})
check(hasattr(t.choices[0].message, "reasoning_content"), "thinking mode returns reasoning_content")
a = main.chat.completions.create(model=MODEL, messages=user, max_tokens=8, temperature=0.9, seed=7)
b = main.chat.completions.create(model=MODEL, messages=user, max_tokens=8, temperature=0.9, seed=7)
check(a.choices[0].message.content == b.choices[0].message.content, "same seed, same sampled text")
n3 = main.chat.completions.create(model=MODEL, messages=user, max_tokens=4, n=3, temperature=1.0, seed=1)
check(len(n3.choices) == 3, "n = 3 returns three choices")
lp = greedy(main, user, n=3, logprobs=True, top_logprobs=2)
check(len(lp.choices[0].logprobs.content) == 3 and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2, "logprobs")

# A tool conversation: definitions, the assistant's call and the tool's result are accepted.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
conv = [{"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-2 C"}]
tc = main.chat.completions.create(model=MODEL, messages=conv, tools=tools, max_tokens=4)
check(tc.choices[0].message.role == "assistant", "tool-call round trip request")
c = main.completions.create(model=MODEL, prompt="The deep sea", max_tokens=5, temperature=0)
check(c.usage.completion_tokens == 5 and isinstance(c.choices[0].text, str), "/v1/completions")

# Prefix reuse: the resent conversation resumes from the cached state, exactly.
first = greedy(main, [{"role": "user", "content": "Once upon a time"}])
turn2 = [{"role": "user", "content": "Once upon a time"},
         {"role": "assistant", "content": first.choices[0].message.content},
         {"role": "user", "content": "Go on."}]
again = greedy(main, turn2)
check(again.usage.prompt_tokens_details.cached_tokens > 0, "a resent conversation reuses cached tokens")
fresh = greedy(tiny, turn2)
check(fresh.usage.prompt_tokens_details.cached_tokens == 0, "no reuse with the prefix cache off")
check(again.choices[0].message.content == fresh.choices[0].message.content, "reused state gives the same output as a fresh prefill")

# Errors in OpenAI's shape; the server keeps serving.
auth = {"Authorization": "Bearer " + KEY}
s, e = raw(MAIN + "/v1/chat/completions", b"{not json", auth)
check(s == 400 and e["error"]["type"] == "invalid_request_error", "400 malformed JSON")
s, e = raw(MAIN + "/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), auth)
check(s == 400 and "robot" in e["error"]["message"], "400 unknown role")
s, e = raw(MAIN + "/v1/chat/completions", json.dumps({"messages": user, "top_p": 3}).encode(), auth)
check(s == 400 and e["error"]["param"] == "top_p", "400 parameter out of range")
s, e = raw(MAIN + "/v1/chat/completions", json.dumps({"messages": user, "max_tokens": 2 ** 40}).encode(), auth)
check(s == 400 and e["error"]["code"] == "context_length_exceeded", "400 prompt longer than the context")
s, e = raw(MAIN + "/v1/chat/completions", json.dumps({"messages": user}).encode(), {"Authorization": "Bearer wrong"})
check(s == 401 and e["error"]["code"] == "invalid_api_key", "401 wrong key")
s, e = raw(MAIN + "/v1/chat/completions", json.dumps({"messages": user, "pad": "x" * (9 << 20)}).encode(), auth)
check(s == 413, "413 oversized body")
s, e = raw(MAIN + "/v1/nothing", b"{}", auth)
check(s == 404 and "error" in e, "404 unknown endpoint")
try:
    openai.OpenAI(base_url=MAIN + "/v1", api_key="wrong", max_retries=0).models.list()
    check(False, "wrong key refused by the client")
except openai.AuthenticationError:
    check(True, "openai client sees AuthenticationError")

# 503 when the queue is full (TINY runs one sequence and queues one).
codes = []
def long_request():
    s, _ = raw(TINY + "/v1/chat/completions", json.dumps({"messages": user, "max_tokens": 120, "temperature": 0}).encode())
    codes.append(s)
threads = [threading.Thread(target=long_request) for _ in range(5)]
[t.start() for t in threads]
[t.join() for t in threads]
check(503 in codes and 200 in codes, f"503 when the queue is full, others served ({sorted(codes)})")

# Load: dozens of concurrent streams; each equals its sequential result (nothing lost or mixed).
prompts = [[{"role": "user", "content": f"Story number {i}"}] for i in range(24)]
expected = [greedy(main, p, n=10).choices[0].message.content for p in prompts]
results = [None] * len(prompts)
def run(i):
    results[i] = stream_text(main, prompts[i], n=10)
threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
[t.start() for t in threads]
[t.join() for t in threads]
check(all(r is not None and r[1] == ["length"] for r in results), "every concurrent stream completed")
check(all(r[0] == e for r, e in zip(results, expected)), "every stream got exactly its own tokens")
# A client that goes away frees its sequence at once.
import re, time
stream = main.chat.completions.create(model=MODEL, messages=user, max_tokens=5000, stream=True)
next(iter(stream)); next(iter(stream))
stream.close()
def running():
    m = urllib.request.urlopen(MAIN + "/metrics").read().decode()
    return int(re.search(r"^hadal_running_sequences (\d+)", m, re.M).group(1))
deadline = time.time() + 10
while running() != 0 and time.time() < deadline:
    time.sleep(0.05)
check(running() == 0, "a disconnected stream frees its sequence")

s, m = urllib.request.urlopen(MAIN + "/metrics").status, urllib.request.urlopen(MAIN + "/metrics").read().decode()
check(s == 200 and "hadal_time_to_first_token_seconds_bucket" in m and "hadal_cached_prompt_tokens_total" in m, "/metrics")
print("all server checks passed")
