"""vitcli.models.hub: failing fast when the Hugging Face Hub is unreachable, and the probe that decides it."""

from __future__ import annotations

import time

import pytest

from vitcli.errors import HubUnreachableError
from vitcli.models.hub import hub_reachable
from vitcli.models.resolve import load_model

# ------------------------------------------------------------------------------------ hub offline


def test_hub_reachable_is_false_offline(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    assert hub_reachable(timeout=1.0) is False
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable(timeout=1.0) is False  # HF_HUB_OFFLINE=1 never probes


@pytest.mark.parametrize("offline_env", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_uncached_pretrained_model_fails_fast_when_the_hub_is_unreachable(unreachable_hub, monkeypatch,
                                                                            offline_env):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_env)
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        load_model("vit_tiny_patch16_224")
    elapsed = time.monotonic() - start

    assert elapsed < 15
    message = str(info.value)
    assert "\n" not in message
    assert "'vit_tiny_patch16_224'" in message and "--weights" in message
    assert constants.HF_HUB_OFFLINE is offline_env  # the temporary offline switch is restored


def test_pretrained_false_needs_no_hub(unreachable_hub):
    loaded = load_model("test_vit", pretrained=False)

    assert loaded.source == "random" and loaded.num_classes == 1000


# ----------------------------------------------------------------------------------- hub probe


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy variables from the machine running the tests."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
                "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def local_proxy():
    """An HTTP proxy on 127.0.0.1 that answers every request itself and records what it was asked."""
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_hub_probe_goes_through_the_users_proxy_and_honours_no_proxy(proxy_env, local_proxy):
    from huggingface_hub import constants

    proxy, seen = local_proxy
    proxy_env.setattr(constants, "HF_HUB_OFFLINE", False)
    proxy_env.setattr(constants, "ENDPOINT", "http://hub.invalid")  # .invalid never resolves (RFC 2606)
    assert hub_reachable(timeout=2.0) is False  # no proxy: the name does not resolve

    proxy_env.setenv("HTTP_PROXY", proxy)
    assert hub_reachable(timeout=2.0) is True
    assert seen == ["http://hub.invalid"]  # the proxy was asked for the hub, by absolute URL

    proxy_env.setenv("NO_PROXY", "hub.invalid")
    assert hub_reachable(timeout=2.0) is False
    assert len(seen) == 1


def test_hub_probe_keeps_its_deadline_when_the_dns_lookup_hangs(proxy_env):
    import socket

    from huggingface_hub import constants

    proxy_env.setattr(constants, "HF_HUB_OFFLINE", False)
    proxy_env.setattr(constants, "ENDPOINT", "https://hub.example")
    proxy_env.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(5) or [])

    start = time.monotonic()
    assert hub_reachable(timeout=0.5) is False
    assert time.monotonic() - start < 1.5
