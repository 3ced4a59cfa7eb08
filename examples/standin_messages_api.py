"""A small stand-in for the Anthropic Messages API (POST /v1/messages, the API's JSON shapes) on
127.0.0.1, for trying `--annotator claude` with no key and no network, and for the tests and
benchmarks. Its "judge" prefers the shorter response, after an optional delay; it can answer with
faults.

    # prints the URL, e.g. http://127.0.0.1:8765
    python examples/standin_messages_api.py --delay 1 &
    ANTHROPIC_API_KEY=x ANTHROPIC_BASE_URL=http://127.0.0.1:8765 \
        python oaif.py --model DIR --annotator claude
"""

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInMessagesAPI:
    """A small stand-in for POST /v1/messages with the API's JSON shapes. Its judge prefers the
    shorter response; `faults` (status codes) are answered first, in order; `always` answers every
    request with a status; `reply` overrides the judge's text and `stop_reason` its stop reason
    ("max_tokens": cut off); `delay` sleeps before each answer. It counts requests (also by model)
    and the most that were in flight at once, and keeps the API keys it was sent."""

    def __init__(
        self, delay=0.0, faults=(), always=None, reply=None, port=0, stop_reason="end_turn"
    ):
        self.delay, self.faults, self.always, self.reply = delay, list(faults), always, reply
        self.requests = self.in_flight = self.peak = 0
        self.keys, self.by_model, self.stop_reason = set(), {}, stop_reason
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with api.lock:
                    api.requests += 1
                    api.in_flight += 1
                    api.peak = max(api.peak, api.in_flight)
                    api.keys.add(self.headers.get("x-api-key") or self.headers.get("authorization"))
                    api.by_model[body["model"]] = api.by_model.get(body["model"], 0) + 1
                    status = api.always or (api.faults.pop(0) if api.faults else 200)
                time.sleep(api.delay)
                if status == 200:
                    text = body["messages"][0]["content"]
                    a, b = re.search(r" 1:\n(.*)\n\n\w+ 2:\n(.*)\n\nWhich", text, re.S).groups()
                    if api.reply:
                        reply = api.reply(a, b)
                    else:
                        reply = f"One is shorter.\nPreferred Response={1 if len(a) < len(b) else 2}"
                    payload = {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": body["model"],
                        "content": [{"type": "text", "text": reply}],
                        "stop_reason": api.stop_reason,
                        "stop_sequence": None,
                        "usage": {"input_tokens": len(text) // 4, "output_tokens": 9},
                    }
                else:
                    kinds = {
                        401: "authentication_error",
                        404: "not_found_error",
                        429: "rate_limit_error",
                        529: "overloaded_error",
                    }
                    payload = {
                        "type": "error",
                        "error": {
                            "type": kinds.get(status, "api_error"),
                            "message": f"stand-in says {status}",
                        },
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if status in (429, 529, 500):
                    # the SDK honours it: keeps the tests fast
                    self.send_header("retry-after-ms", "20")
                self.end_headers()
                self.wfile.write(data)
                with api.lock:
                    api.in_flight -= 1

        class Server(ThreadingHTTPServer):
            # the default listen backlog (5) would serialise a burst of requests
            request_queue_size = 128

        self.server = Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def models(self):
        return set(self.by_model)

    def client(self, max_retries=2):
        import anthropic

        return anthropic.Anthropic(
            base_url=self.url, api_key="test-key", max_retries=max_retries, timeout=10
        )

    def close(self):
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description="Stand-in Messages API on 127.0.0.1 (prefers the shorter response)."
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    a = p.parse_args()
    server = StandInMessagesAPI(delay=a.delay, port=a.port)
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
