"""Loading from the Hugging Face Hub through timm, failing fast with one line when it is unreachable."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitcli.errors import HubUnreachableError, ModelLoadError, first_line

HUB_PROBE_TIMEOUT_S = 3.0
NETWORK_ERRORS = frozenset({"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                            "ConnectError", "ConnectTimeout", "gaierror"})  # by name: huggingface_hub/httpx/requests


def create_from_hub(name: str, pretrained: bool, kwargs: dict[str, Any], *, store: Path,
                    implicit: bool = False) -> nn.Module:
    """timm.create_model for hub weights, failing fast with one line when the hub is unreachable.

    ``store``: the local model store, named in the message as the way out offline.
    ``implicit``: ``name`` came from a plain ``org/name`` that is no local path either, so the
    message says that it was looked for in both places.
    """
    also = f" (and there is no local folder '{name.removeprefix('hf-hub:')}')" if implicit else ""
    if not pretrained and not name.startswith("hf-hub:"):
        return timm.create_model(name, pretrained=False, **kwargs)
    offline = not hub_reachable()
    try:
        # Offline, only the local Hugging Face cache is used (no retries for a minute). An hf-hub:
        # id needs its config.json from the hub even for --no-pretrained.
        with hub_offline(offline):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # huggingface_hub raises many types (OSError, HfHubHTTPError, ...)
        if offline or is_network_error(e):
            raise HubUnreachableError(
                f"could not reach the Hugging Face Hub to download '{name}' and it is not cached{also}; "
                f"use --weights FILE, a local model folder, or run `vitcli weights pull {name}` "
                f"where there is internet and copy the folder into {store}/"
            ) from e
        raise ModelLoadError(f"could not load pretrained weights for '{name}'{also}: {first_line(e)}") from e


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers an HTTP HEAD within ``timeout`` seconds in all.

    The request goes through urllib's proxy handling (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, as
    huggingface_hub's own client does), and it runs in a daemon thread so that the DNS lookup, which
    no socket timeout covers, counts against the deadline too. (huggingface_hub itself retries for
    ~45 s offline, hence a probe of our own.) Any HTTP answer, even an error status, means reachable.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD", headers={"User-Agent": "vitcli"})
        try:
            with urllib.request.build_opener().open(request, timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError:  # the hub (or the proxy in front of it) answered
            answered.append(True)
        except Exception:  # URLError, timeouts, refused connections, DNS failures
            answered.append(False)

    thread = threading.Thread(target=probe, name="vitcli-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode for the duration (only its local cache is read), if ``offline``."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def is_network_error(e: BaseException) -> bool:
    """Whether ``e``, or anything in its cause chain, says the network (or the hub) was not there."""
    return bool({type(x).__name__ for x in _chain(e)} & NETWORK_ERRORS)


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__
