"""End to end: the three services as processes, a signup over HTTP, the email, the link."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devstack.procs import wait_for_port
from devstack.services import ServiceProcess
from devstack.smtp_sink import SmtpSink
from tests.helpers import eventually, signup_body, verify_link

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def stack(
    clean: None, service_env: dict[str, str], ports: dict[str, int], workdir: Path
) -> Iterator[dict[str, Any]]:
    env = {
        **service_env,
        "API_PORT": str(ports["api"]),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{ports['api']}",
    }
    logs = workdir / "e2e-logs"
    procs = {
        "api": ServiceProcess("api", env, logs / "api.log"),
        "relay": ServiceProcess(
            "relay", {**env, "METRICS_PORT": str(ports["relay"])}, logs / "relay.log"
        ),
        "worker": ServiceProcess(
            "worker", {**env, "METRICS_PORT": str(ports["worker"])}, logs / "worker.log"
        ),
    }
    for p in procs.values():
        p.start()
    try:
        wait_for_port(ports["api"], 30, procs["api"].proc)
        wait_for_port(ports["worker"], 30, procs["worker"].proc)
        wait_for_port(ports["relay"], 30, procs["relay"].proc)
        yield {"procs": procs, "base": f"http://127.0.0.1:{ports['api']}", "ports": ports}
    finally:
        codes = {name: p.terminate() for name, p in procs.items()}
        for name, p in procs.items():
            log = p.logs()
            # Graceful stop, and nothing was logged as an unhandled failure.
            assert codes[name] == 0, f"{name} exited {codes[name]}:\n{log[-3000:]}"
            assert '"level":"error"' not in log, f"{name} logged an error:\n{log[-3000:]}"


async def test_signup_email_link_verifies_once(stack: dict[str, Any], smtp_sink: SmtpSink) -> None:
    base = stack["base"]
    password = "correct horse battery"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{base}/v1/users",
            json=signup_body("e2e", password=password),
            headers={"X-Request-ID": "e2e-request-1"},
        )
        assert resp.status == 201, await resp.text()

        async def mail_arrived() -> bool:
            return len(smtp_sink.messages()) == 1

        await eventually(mail_arrived, timeout=10)
        (msg,) = smtp_sink.messages()
        assert msg["To"] == "User e2e <usere2e@example.com>"
        link = verify_link(msg)
        # The raw .eml (what `make run` users open) carries the link verbatim.
        raw = b"".join(p.read_bytes() for p in smtp_sink.directory.glob("*.eml")).decode()
        assert link in raw
        assert link.startswith(base)
        first = await http.get(link, headers={"Accept": "application/json"})
        assert first.status == 200
        assert await first.json() == {"is_verified": True}
        second = await http.get(link, headers={"Accept": "application/json"})
        assert second.status == 409
        assert second.content_type == "application/problem+json"
        # Every service says what it did with this request id, and none leaks secrets.
        await asyncio.sleep(0.2)
    code = re.search(r"secret_code=([\w-]+)", link)
    assert code is not None
    for name, proc in stack["procs"].items():
        log = proc.logs()
        assert password not in log, name
        assert code.group(1) not in log, name
        assert "$argon2id$" not in log, name
    assert "e2e-request-1" in stack["procs"]["api"].logs()
    assert "e2e-request-1" in stack["procs"]["worker"].logs()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
async def test_link_opens_in_a_real_browser(stack: dict[str, Any], smtp_sink: SmtpSink) -> None:
    assert CHROMIUM is not None
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{stack['base']}/v1/users", json=signup_body("browser"))
        assert resp.status == 201

    async def mail_arrived() -> bool:
        return len(smtp_sink.messages()) == 1

    await eventually(mail_arrived, timeout=10)
    link = verify_link(smtp_sink.messages()[0])

    def dump_dom(url: str) -> str:
        with tempfile.TemporaryDirectory() as profile:
            out = subprocess.run(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        return out.stdout

    first = await asyncio.to_thread(dump_dom, link)
    assert "Email verified" in first
    second = await asyncio.to_thread(dump_dom, link)
    assert "This link does not work" in second
    assert "used already" in second


async def test_an_expired_link_is_replaced_by_a_resend(
    stack: dict[str, Any], smtp_sink: SmtpSink, pool: Any
) -> None:
    """A person who let the link expire asks for a new one: a second email with a link
    that works, through the whole pipeline; the first stays expired."""
    base = stack["base"]
    async with aiohttp.ClientSession() as http:
        assert (await http.post(f"{base}/v1/users", json=signup_body("late"))).status == 201
        await eventually(lambda: _count_is(smtp_sink, 1), timeout=10)
        first = verify_link(smtp_sink.messages()[0])
        await pool.execute("UPDATE verify_emails SET expires_at = now() - interval '1 second'")
        resp = await http.get(first, headers={"Accept": "application/json"})
        assert resp.status == 410
        assert "/v1/verify_email/resend" in (await resp.json())["detail"]
        # The signup itself counts as the last request: the interval must pass first.
        await pool.execute("UPDATE users SET verify_requested_at = now() - interval '1 hour'")
        resend = await http.post(
            f"{base}/v1/verify_email/resend", json={"email": "UserLate@Example.com"}
        )
        assert resend.status == 202
        await eventually(lambda: _count_is(smtp_sink, 2), timeout=10)
        second = verify_link(smtp_sink.messages()[1])
        assert second != first
        ok = await http.get(second, headers={"Accept": "application/json"})
        assert ok.status == 200
        assert await ok.json() == {"is_verified": True}
        assert (await http.get(first, headers={"Accept": "application/json"})).status == 410


async def _count_is(sink: SmtpSink, n: int) -> bool:
    return len(sink.messages()) == n
