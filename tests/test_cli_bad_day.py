"""The CLI and client on a person's bad day: connection mistakes explained in seconds, TLS inputs checked
before gRPC can abort the process, argument mistakes reported once before anything is sent, the tool's own
drawings never read back as inputs, and summaries a person (or a script) can act on."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import unused_port
from florence2_serve.client import AsyncFlorence2Client, Florence2Client, RpcError
from florence2_serve.client.cli import cli
from florence2_serve.client.connection import with_default_port
from service_helpers import start_front_end
from test_security import _cert, _key, pki  # noqa: F401 - pki: the CA and certificates fixture

EXE = str(Path(sys.executable).parent / "florence2")


def run_cli(*args: str, env: dict | None = None):
    started = time.monotonic()
    result = CliRunner().invoke(cli, list(args), env=env)
    return result, time.monotonic() - started


# -- connection trouble, in seconds, in one line ----------------------------------------------------------

def test_nothing_listening_and_unknown_host_are_said_at_once():
    port = unused_port()
    result, took = run_cli("models", "--server", f"127.0.0.1:{port}")
    assert result.exit_code == 1 and took < 2.5, (took, result.output)
    assert result.output.strip() == (f"error: cannot connect to 127.0.0.1:{port}: nothing is listening there; "
                                     "start one with `florence2 up`, or point --server (env FLORENCE2_SERVER) at yours")
    result, took = run_cli("health", "--server", "no-such-host.invalid:50051")
    assert result.exit_code == 1 and took < 5, took
    assert "unknown host 'no-such-host.invalid'" in result.output and len(result.output.strip().splitlines()) == 1


def test_an_address_without_a_port_goes_to_50051():
    assert with_default_port("127.0.0.1") == "127.0.0.1:50051"
    assert with_default_port("frontend.example") == "frontend.example:50051"
    assert with_default_port("[::1]") == "[::1]:50051" and with_default_port("::1") == "[::1]:50051"
    assert with_default_port("10.0.0.1:6000") == "10.0.0.1:6000"
    assert with_default_port("dns:///f.svc:50051") == "dns:///f.svc:50051"
    with Florence2Client("127.0.0.1") as client:
        assert client.address == "127.0.0.1:50051"


@pytest.fixture
def other_ca(tmp_path):
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / "other-ca.pem"
    path.write_bytes(_cert("someone else's CA", _key(), ca=True).public_bytes(serialization.Encoding.PEM))
    return path


def test_tls_mistakes_are_named_with_what_to_try(valkey, pki, other_ca):
    cert, key = pki["server"]
    ca = str(pki["ca"])
    tls = start_front_end(valkey.connection_url, tls_cert=str(cert), tls_key=str(key), http_port=-1)
    mtls = start_front_end(valkey.connection_url, tls_cert=str(cert), tls_key=str(key), tls_client_ca=ca,
                           http_port=-1)
    plain = start_front_end(valkey.connection_url, http_port=-1)
    client_cert, client_key = (str(p) for p in pki["client"])
    cases = [
        (["--server", f"127.0.0.1:{tls.port}"], "the server speaks TLS and this client plaintext; add --tls"),
        (["--server", f"127.0.0.1:{tls.port}", "--ca", str(other_ca)], "its certificate is not trusted"),
        (["--server", f"127.0.0.1:{mtls.port}", "--ca", ca], "requires a client certificate (mutual TLS); pass --cert"),
        (["--server", f"127.0.0.1:{plain.port}", "--ca", ca], "the server does not speak TLS there; drop --tls/--ca"),
    ]
    try:
        for args, expected in cases:
            result, took = run_cli("models", *args, "--connect-timeout", "1")
            assert result.exit_code == 1 and expected in result.output, (args, result.output)
            assert len(result.output.strip().splitlines()) == 1 and took < 5, (args, took)
        ok, _ = run_cli("models", "--server", f"localhost:{mtls.port}", "--ca", ca, "--cert", client_cert,
                        "--key", client_key)
        assert ok.exit_code == 0, ok.output
    finally:
        for front in (tls, mtls, plain):
            front.stop()


def test_a_wrong_ca_prints_no_grpc_core_lines(valkey, pki, other_ca):
    cert, key = pki["server"]
    front = start_front_end(valkey.connection_url, tls_cert=str(cert), tls_key=str(key), http_port=-1)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    try:
        result = subprocess.run([EXE, "models", "--server", f"127.0.0.1:{front.port}", "--ca", str(other_ca),
                                 "--connect-timeout", "1"], capture_output=True, text=True, env=env, timeout=60)
    finally:
        front.stop()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(result.stderr.splitlines()) == 1 and "not trusted" in result.stderr


def test_tls_inputs_are_checked_before_grpc_can_abort(pki, tmp_path):
    cert, key = (p.read_bytes() for p in pki["client"])
    result, _ = run_cli("models", "--cert", str(pki["client"][0]))  # no --key: gRPC's C core would abort
    assert result.exit_code == 2
    assert result.output.strip() == "error: --cert and --key go together (mutual TLS): --key is missing"
    with pytest.raises(ValueError, match="certificate and its private key together"):
        Florence2Client("127.0.0.1:1", certificate_chain=cert)
    with pytest.raises(ValueError, match="not PEM"):
        AsyncFlorence2Client("127.0.0.1:1", root_certificates=b"not a certificate")
    other_key = pki["server"][1].read_bytes()
    with pytest.raises(ValueError, match="do not go together"):
        Florence2Client("127.0.0.1:1", certificate_chain=cert, private_key=other_key)
    missing, _ = run_cli("models", "--ca", str(tmp_path / "nope.pem"))
    assert missing.exit_code == 2 and "nope.pem" in missing.output


def test_the_clients_show_their_parameters_and_docs():
    for client in (Florence2Client, AsyncFlorence2Client):
        parameters = inspect.signature(client.__init__).parameters
        assert {"token", "timeout", "retry", "tls", "root_certificates", "certificate_chain", "private_key",
                "load_balancing"} <= set(parameters), client
        assert client.__doc__ and "root_certificates" in client.__doc__ and "check_connection" in client.__doc__


# -- argument mistakes, once, before anything is sent -------------------------------------------------------

def test_task_argument_mistakes_are_one_usage_error_before_connecting(tmp_path):
    for i in range(5):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    nowhere = f"127.0.0.1:{unused_port()}"  # no server: the mistake is found before any connection
    for args, expected in (
        (["--task", "CAPTION_TO_PHRASE_GROUNDING"], "task CAPTION_TO_PHRASE_GROUNDING needs text input (pass --text)"),
        (["--task", "CAPTION", "--text", "a car"], "task CAPTION takes no text input (drop --text)"),
        (["--task", "REGION_TO_CATEGORY"], "needs a region (x1, y1, x2, y2 in pixels) (pass --region x1,y1,x2,y2)"),
        (["--task", "OD", "--region", "1,2,3,4"], "task OD takes no region (drop --region)"),
        (["--task", "REGION_TO_CATEGORY", "--region", "5,5,2,9"], "need 0 <= x1 < x2 and 0 <= y1 < y2"),
        (["--task", "NOT_A_TASK"], "NOT_A_TASK"),
    ):
        for command in ("detect", "submit"):
            result, _ = run_cli(command, str(tmp_path), "--server", nowhere, "--model", "m", *args)
            assert result.exit_code == 2, (command, args, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, lines)


def test_drawings_are_never_read_back_as_inputs(noop_stack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 24), (i * 40, 90, 90)).save(photos / f"img{i}.jpg")
    for run in range(2):  # the second run must not read the first run's drawings
        result, _ = run_cli("detect", "photos", "--server", noop_stack.address, "--model", "nop",
                            "--draw", "photos/drawn")
        assert result.exit_code == 0, result.output
        assert "3 images: 3 succeeded" in result.output, (run, result.output)
    assert len(list((photos / "drawn").rglob("*.png"))) == 6  # 3, then 3 beside them
    # The tool's drawing names are skipped wherever they lie, so are those kept beside older ones.
    (photos / "img0.jpg.od.png").write_bytes((photos / "drawn" / "photos" / "img0.jpg.od.png").read_bytes())
    (photos / "img0.jpg.caption-2.png").write_bytes(b"x")
    again, _ = run_cli("detect", "photos", "--server", noop_stack.address, "--model", "nop")
    assert "3 images: 3 succeeded" in again.output, again.output


# -- smaller things ---------------------------------------------------------------------------------------

def test_small_messages_say_what_is_wrong(noop_stack, tmp_path):
    import redis

    from florence2_serve.common import redis_layout as layout

    health, _ = run_cli("health", "--server", noop_stack.address, "--model", "nope")
    assert health.exit_code == 1
    assert health.output.strip() == ("error: NOT_FOUND [UNKNOWN_MODEL]: no model 'nope' has registered "
                                     "(see `florence2 models`)")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result, _ = run_cli("detect", str(empty), "--server", noop_stack.address, "--model", "nop")
    assert result.exit_code == 1 and "the file is empty" in result.output, result.output
    # A model whose workers are gone: listed plainly, and not offered as one "with live workers".
    redis.Redis.from_url(noop_stack.url).sadd(layout.MODELS_KEY, "gone")
    models, _ = run_cli("models", "--server", noop_stack.address)
    assert "gone: no live workers, 0 queued" in models.output and "UNSPECIFIED" not in models.output
    with pytest.raises(RpcError) as unknown:
        noop_stack.client.detect(Image.new("RGB", (8, 8)), "nobody", "OD")
    assert "models with live workers: nop" in unknown.value.details()
    assert "--embedded" not in run_cli("submit", "--help")[0].output
    assert "--embedded" in run_cli("detect", "--help")[0].output


def test_doctor_reads_the_server_from_the_environment():
    port = unused_port()
    result, _ = run_cli("doctor", "--json", env={"FLORENCE2_SERVER": f"127.0.0.1:{port}"})
    assert f"127.0.0.1:{port}" in result.output


# -- summaries --------------------------------------------------------------------------------------------

def test_summaries_count_in_words_and_list_what_failed(noop_stack, tmp_path):
    from florence2_serve.client.cli_detect import Tally

    tally = Tally(succeeded=1)
    assert tally.line(1).startswith("1 image: 1 succeeded, 0 failed") and "images/s" in tally.line(1)
    all_failed = Tally(failed=3)
    assert "images/s" not in all_failed.line(3) and all_failed.line(3).startswith("3 images:")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result, _ = run_cli("detect", str(good), str(bad), "--server", noop_stack.address, "--model", "nop")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "2 images: 1 succeeded, 1 failed" in result.output
    failed_at = lines.index("failed:")
    assert lines[failed_at + 1].startswith(f"  {bad}: ") and "IMAGE_UNREADABLE" in lines[failed_at + 1]


def test_make_test_model_says_what_it_is_doing(tmp_path):
    result = CliRunner().invoke(cli, ["make-test-model", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    assert "building a tiny Florence-2 with random weights" in result.output and "built in" in result.output


@pytest.mark.slow
def test_up_opens_its_port_once_its_workers_are_live(tmp_path):
    """A client that connects the moment `up`'s port opens finds every model it was told to serve."""
    import signal

    port = unused_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    up = subprocess.Popen([EXE, "up", "--model", "first=noop", "--model", "second=noop", "--kind", "noop",
                           "--in-memory", "--address", f"127.0.0.1:{port}", "--no-http"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with Florence2Client(f"127.0.0.1:{port}", timeout=5) as client:
                    client.check_connection(0.2)
                    live = {m.name: m.live_workers for m in client.list_models()}
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert up.poll() is None, up.stderr.read()
                time.sleep(0.05)
        assert live == {"first": 1, "second": 1}
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.stderr.read().rstrip().endswith("stopped")


@pytest.mark.slow
def test_results_and_the_progress_bar_share_a_terminal_without_mixing(noop_stack, tmp_path):
    """On a terminal every result line starts a line of its own, however the bar redraws."""
    import pty
    import select

    for i in range(12):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / f"img{i:02d}.png")
    leader, follower = pty.openpty()
    process = subprocess.Popen([EXE, "detect", str(tmp_path), "--server", noop_stack.address, "--model", "nop",
                                "--concurrency", "2"], stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=60)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    starts = [m.start() for m in re.finditer(re.escape(str(tmp_path)) + r"/img\d\d\.png: ", text)]
    assert len(starts) == 12 and "images" in text.replace("12 images:", ""), text  # the bar was drawn too
    assert all(start == 0 or text[start - 1] in "\r\n" for start in starts), text
